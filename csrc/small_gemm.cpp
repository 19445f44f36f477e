// Small-row GEMM (see small_gemm.h for the design).
#include "small_gemm.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace engine_native {

bool small_gemm_compiled() {
#if defined(__AVX512F__)
  return true;
#else
  return false;
#endif
}

at::Tensor small_gemm_pack(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2, "engine native: small_gemm_pack needs a 2-D weight");
  const int64_t n = weight.size(0), k = weight.size(1), panels = (n + 15) / 16;
  at::Tensor padded = at::zeros({panels * 16, k}, weight.options());
  padded.narrow(0, 0, n).copy_(weight);
  return padded.view({panels, 16, k}).transpose(1, 2).contiguous();
}

#if defined(__AVX512F__)
namespace {

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {  // bfloat16 -> float32: the high half of a float
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

inline void store16(float* p, __m512 v, __mmask16 mask) { _mm512_mask_storeu_ps(p, mask, v); }
inline void store16(c10::BFloat16* p, __m512 v, __mmask16 mask) {
  alignas(64) float tmp[16];
  _mm512_store_ps(tmp, v);
  for (int j = 0; j < 16; ++j)
    if (mask >> j & 1) p[j] = static_cast<c10::BFloat16>(tmp[j]);  // round to nearest even
}

// The weight streams from DRAM at batch 1 (the head's 12 fc weights are 48 MB, more than this
// VM's effective share of L3, ~24-32 MB): with the hardware prefetcher alone 12 x [M, 1024] @
// [1024, 1024] ran at 8-14 GB/s for M = 4-16; prefetching 32 lines (2 KB) ahead in each panel
// (best of 8-64) made it 1.14-1.41x (alternating processes, 2026-12-02), equal at M = 1-2.
constexpr int kPrefetchLines = 32;

// MB rows, NP panels at a time: MB * NP accumulators stay in registers over the whole K.
template <int MB, int NP, typename W, typename O>
void panel_rows(const float* at_, const W* panels, int64_t K, int64_t N, O* out, int64_t ldo,
                int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; p += NP) {
    const int np = static_cast<int>(std::min<int64_t>(NP, p1 - p));
    __m512 acc[MB][NP];
    for (int i = 0; i < MB; ++i)
      for (int j = 0; j < NP; ++j) acc[i][j] = _mm512_setzero_ps();
    const W* w0 = panels + p * K * 16;
    if (np == NP) {
      for (int64_t k = 0; k < K; ++k) {
        __m512 wv[NP];
        for (int j = 0; j < NP; ++j) {
          const W* q = w0 + (j * K + k) * 16;
          // Software prefetch kPrefetchLines ahead in each panel's stream (a prefetch past the
          // panel's end reads the next panel's start: harmless, no fault).
          _mm_prefetch(reinterpret_cast<const char*>(q + kPrefetchLines * 16), _MM_HINT_T0);
          wv[j] = load16(q);
        }
        for (int i = 0; i < MB; ++i) {
          const __m512 av = _mm512_set1_ps(at_[k * MB + i]);
          for (int j = 0; j < NP; ++j) acc[i][j] = _mm512_fmadd_ps(av, wv[j], acc[i][j]);
        }
      }
    } else {  // the last panels of a range
      for (int j = 0; j < np; ++j)
        for (int64_t k = 0; k < K; ++k) {
          const __m512 wv = load16(w0 + (j * K + k) * 16);
          for (int i = 0; i < MB; ++i)
            acc[i][j] = _mm512_fmadd_ps(_mm512_set1_ps(at_[k * MB + i]), wv, acc[i][j]);
        }
    }
    for (int j = 0; j < np; ++j) {
      const int64_t col = (p + j) * 16, left = std::min<int64_t>(16, N - col);
      const __mmask16 mask = static_cast<__mmask16>(left >= 16 ? 0xFFFF : (1u << left) - 1);
      for (int i = 0; i < MB; ++i) store16(out + i * ldo + col, acc[i][j], mask);
    }
  }
}

template <int MB, typename W, typename O>
void run_rows(const float* at_, const W* panels, int64_t K, int64_t N, O* out, int64_t ldo) {
  // Panels per register block: MB * NP accumulators + NP weight vectors fit in 32 zmm.
  constexpr int NP = MB <= 4 ? 4 : (MB <= 13 ? 2 : 1);
  const int64_t P = (N + 15) / 16;
  at::parallel_for(0, P, 4, [&](int64_t p0, int64_t p1) {
    panel_rows<MB, NP>(at_, panels, K, N, out, ldo, p0, p1);
  });
}

template <typename W, typename O>
void dispatch_rows(int64_t M, const float* at_, const W* panels, int64_t K, int64_t N, O* out,
                   int64_t ldo) {
  switch (M) {
#define ENGINE_ROWS(m) \
  case m:              \
    return run_rows<m>(at_, panels, K, N, out, ldo);
    ENGINE_ROWS(1) ENGINE_ROWS(2) ENGINE_ROWS(3) ENGINE_ROWS(4) ENGINE_ROWS(5) ENGINE_ROWS(6)
    ENGINE_ROWS(7) ENGINE_ROWS(8) ENGINE_ROWS(9) ENGINE_ROWS(10) ENGINE_ROWS(11) ENGINE_ROWS(12)
    ENGINE_ROWS(13) ENGINE_ROWS(14) ENGINE_ROWS(15) ENGINE_ROWS(16)
#undef ENGINE_ROWS
    default:
      TORCH_CHECK(false, "engine native: small_gemm takes at most ", kSmallGemmMaxRows, " rows");
  }
}

template <typename A>
void transpose_rows(const at::Tensor& a, std::vector<float>& at_) {
  const int64_t M = a.size(0), K = a.size(1), lda = a.stride(0);
  const A* ap = a.data_ptr<A>();
  at_.resize(static_cast<size_t>(K * M));
  for (int64_t i = 0; i < M; ++i)
    for (int64_t k = 0; k < K; ++k) at_[k * M + i] = static_cast<float>(ap[i * lda + k]);
}

}  // namespace
#endif

at::Tensor small_gemm_run(const at::Tensor& a, const at::Tensor& panels, int64_t n,
                          const at::Tensor& out_in) {
  TORCH_CHECK(small_gemm_compiled(), "engine native: small_gemm needs an AVX-512 build");
  const int64_t M = a.size(0), K = a.size(1);
  TORCH_CHECK(a.dim() == 2 && a.stride(1) == 1, "engine native: small_gemm needs rows of A contiguous");
  TORCH_CHECK(M >= 1 && M <= kSmallGemmMaxRows, "engine native: small_gemm takes 1 to ",
              kSmallGemmMaxRows, " rows, got ", M);
  TORCH_CHECK(panels.dim() == 3 && panels.size(1) == K && panels.size(2) == 16 &&
                  panels.size(0) == (n + 15) / 16,
              "engine native: small_gemm panels ", panels.sizes(), " do not fit K=", K, ", N=", n);
  TORCH_CHECK(a.scalar_type() == at::kFloat || a.scalar_type() == at::kBFloat16,
              "engine native: small_gemm takes float32 or bfloat16 rows");
  at::Tensor out = out_in.defined() && out_in.scalar_type() == a.scalar_type() &&
                           out_in.size(0) >= M && out_in.size(1) == n && out_in.stride(1) == 1
                       ? out_in
                       : at::empty({M, n}, a.options());
#if defined(__AVX512F__)
  thread_local std::vector<float> at_;
  if (a.scalar_type() == at::kFloat)
    transpose_rows<float>(a, at_);
  else
    transpose_rows<c10::BFloat16>(a, at_);
  const int64_t ldo = out.stride(0);
  const bool wf = panels.scalar_type() == at::kFloat;
  TORCH_CHECK(wf || panels.scalar_type() == at::kBFloat16,
              "engine native: small_gemm weights must be float32 or bfloat16");
  if (a.scalar_type() == at::kFloat) {
    float* o = out.data_ptr<float>();
    if (wf) dispatch_rows(M, at_.data(), panels.data_ptr<float>(), K, n, o, ldo);
    else dispatch_rows(M, at_.data(), panels.data_ptr<c10::BFloat16>(), K, n, o, ldo);
  } else {
    c10::BFloat16* o = out.data_ptr<c10::BFloat16>();
    if (wf) dispatch_rows(M, at_.data(), panels.data_ptr<float>(), K, n, o, ldo);
    else dispatch_rows(M, at_.data(), panels.data_ptr<c10::BFloat16>(), K, n, o, ldo);
  }
#endif
  // The head loop passes buffers of exactly M rows: skip the (dispatched) narrow, ~14 a step.
  return out.size(0) == M ? out : out.narrow(0, 0, M);
}

}  // namespace engine_native
