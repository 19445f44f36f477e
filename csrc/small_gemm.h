// Small-row GEMM for the native head loop: out[M, N] = A[M, K] @ W^T for M <= kSmallGemmMaxRows.
//
// At batch 1 the diffusion head multiplies a handful of rows (2 x the tokens of a MAR step under
// CFG) by 1024 x 1024 weights 100 times a MAR step: the product is bound by reading the weight,
// and MKL / oneDNN reach a third to a half of the bandwidth there (benchmarks/bench_kernels.py).
// This kernel reads the weight once for all rows, as one contiguous stream: the weight is packed
// once into panels of 16 output columns ([ceil(N/16), K, 16], zero-padded), the rows are
// transposed into a [K, M] float32 buffer (so each k's M values are adjacent: rows 4 KB apart
// would alias in L1), and every (row, panel) accumulator lives in registers (one zmm, two ymm on
// AVX2) for the whole K (AVX2 past 6 rows: for 1 KB blocks of it, see small_gemm.cpp).
// float32 or bfloat16 weights and activations; always float32 accumulation (bfloat16 rows and
// weights on AVX512-BF16 builds: vdpbf16ps, exact bf16 products summed in float32 in pairs).
#pragma once

#include <ATen/ATen.h>

namespace engine_native {

constexpr int64_t kSmallGemmMaxRows = 16;

// Whether this build's kernel is SIMD (AVX-512 or AVX2 + FMA), which the head loop's plan uses
// for products of few rows; small_gemm_run works in every build (portable C++ otherwise).
bool small_gemm_compiled();

// "avx512", "avx2" or "portable": the instruction set this build's kernel uses.
const char* small_gemm_isa();

// Whether bfloat16 weights are packed in k pairs and bfloat16 rows multiplied with vdpbf16ps
// (builds for CPUs with AVX512-BF16).
bool small_gemm_bf16_dot();

// W [N, K] (float32 or bfloat16) -> the panel layout [ceil(N/16), K, 16], same dtype; bfloat16
// on small_gemm_bf16_dot() builds: [ceil(N/16), ceil(K/2), 16, 2] (k pairs, zero-padded).
at::Tensor small_gemm_pack(const at::Tensor& weight);

// out [M, N] (A's dtype; written, also returned) = A [M, K] @ W^T, M <= kSmallGemmMaxRows,
// `panels` from small_gemm_pack of W [N, K]. A's rows may be strided; its dtype float32 or bfloat16.
at::Tensor small_gemm_run(const at::Tensor& a, const at::Tensor& panels, int64_t n,
                          const at::Tensor& out);

}  // namespace engine_native
