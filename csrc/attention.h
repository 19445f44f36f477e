// Bidirectional attention on the CPU, out = softmax(q k^T * scale) v per (batch, head), for the
// native backend's transformer (engine/attention.py). At MAR's shapes (a few hundred keys, head
// width 64) torch's SDPA ran at a quarter to a third of the float32 GEMM peak, and its bf16 path
// no faster; this kernel keeps a block of query rows' whole score rows in L1/L2, so the softmax
// is the exact two-pass one (max, then exp and sum: no online rescaling):
//   * per (batch, head) K is packed once into panels of 16 keys ([ceil(Lk/16), D, 16]) and V is
//     widened to float32 rows, both read from L2 by every query block;
//   * per block of query rows (8 with AVX-512, 6 with AVX2, 4 otherwise) the scores are
//     register-blocked FMAs over the head width, exp is torch's vectorised Sleef exp (AVX-512)
//     or the polynomial torch's own SDPA softmax uses (AVX2), and P V accumulates in registers
//     over all keys, scaled by 1 / sum at the store.
// float32 or bfloat16 q, k, v; the output has q's dtype. Float32 arithmetic, except bfloat16
// inputs on CPUs with AVX512-BF16 (attention_bf16_dot()): there both products are vdpbf16ps
// (exact bf16 products, float32 sums; twice the float32 FMA rate) and the probabilities enter
// P V rounded to bfloat16, as in torch's bf16 flash attention; scores, softmax, 1 / sum float32.
#pragma once

#include <ATen/ATen.h>

namespace engine_native {

// q [B, H, Lq, D], k / v [B, H, Lk, D] (each with unit stride in D) -> [B, H, Lq, D] contiguous.
at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale);

// Whether this build multiplies bfloat16 inputs with vdpbf16ps (see above).
bool attention_bf16_dot();

}  // namespace engine_native
