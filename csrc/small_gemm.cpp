// Small-row GEMM (see small_gemm.h for the design).
#include "small_gemm.h"
#include "vec16.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <string>
#include <type_traits>
#include <vector>

namespace engine_native {

const char* small_gemm_isa() {
#if defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
  return "avx2";
#else
  return "portable";
#endif
}

// The plan routes small products here only where the SIMD kernel was measured faster than
// MKL / oneDNN (AVX-512, AVX2); the portable build is for correctness anywhere.
bool small_gemm_compiled() { return std::string(small_gemm_isa()) != "portable"; }

bool small_gemm_bf16_dot() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

at::Tensor small_gemm_pack(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2, "engine native: small_gemm_pack needs a 2-D weight");
  const int64_t n = weight.size(0), k = weight.size(1), panels = (n + 15) / 16;
  if (weight.scalar_type() == at::kBFloat16 && small_gemm_bf16_dot()) {
    // [P, ceil(K/2), 16, 2]: each k pair of a panel's 16 columns is one 64-byte vector, the
    // operand layout of vdpbf16ps (K zero-padded to even).
    const int64_t k2 = (k + 1) / 2;
    at::Tensor padded = at::zeros({panels * 16, 2 * k2}, weight.options());
    padded.narrow(0, 0, n).narrow(1, 0, k).copy_(weight);
    return padded.view({panels, 16, k2, 2}).permute({0, 2, 1, 3}).contiguous();
  }
  at::Tensor padded = at::zeros({panels * 16, k}, weight.options());
  padded.narrow(0, 0, n).copy_(weight);
  return padded.view({panels, 16, k}).transpose(1, 2).contiguous();
}

namespace {

inline void prefetch(const void* p) {
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
  _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0);
#else
  __builtin_prefetch(p);
#endif
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
    Vec16 acc[MB][NP];
    for (int i = 0; i < MB; ++i)
      for (int j = 0; j < NP; ++j) acc[i][j] = Vec16::zero();
    const W* w0 = panels + p * K * 16;
    if (np == NP) {
      for (int64_t k = 0; k < K; ++k) {
        Vec16 wv[NP];
        for (int j = 0; j < NP; ++j) {
          const W* q = w0 + (j * K + k) * 16;
          // Software prefetch kPrefetchLines ahead in each panel's stream (a prefetch past the
          // panel's end reads the next panel's start: harmless, no fault).
          prefetch(q + kPrefetchLines * 16);
          wv[j] = Vec16::load(q);
        }
        for (int i = 0; i < MB; ++i) {
          const float a = at_[k * MB + i];
          for (int j = 0; j < NP; ++j) acc[i][j] = Vec16::fma(a, wv[j], acc[i][j]);
        }
      }
    } else {  // the last panels of a range
      for (int j = 0; j < np; ++j)
        for (int64_t k = 0; k < K; ++k) {
          const Vec16 wv = Vec16::load(w0 + (j * K + k) * 16);
          for (int i = 0; i < MB; ++i) acc[i][j] = Vec16::fma(at_[k * MB + i], wv, acc[i][j]);
        }
    }
    for (int j = 0; j < np; ++j) {
      const int64_t col = (p + j) * 16;
      for (int i = 0; i < MB; ++i) store16(out + i * ldo + col, acc[i][j], N - col);
    }
  }
}

// Panels per register block: MB * NP accumulators and NP weight vectors in the register file
// (32 zmm: 4 panels up to 4 rows, 2 up to 13; 16 ymm, two per panel: 2 panels up to 2 rows);
// past that one panel, and the compiler spills a little.
template <int MB>
constexpr int panels_per_block() {
#if defined(__AVX512F__)
  return MB <= 4 ? 4 : (MB <= 13 ? 2 : 1);
#elif defined(__AVX2__) && defined(__FMA__)
  return MB <= 2 ? 2 : 1;
#else
  return 1;
#endif
}

#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
// AVX2 past 6 rows: 2 x MB accumulators would not fit 16 ymm (at 16 rows the spilling kernel ran
// at 0.6x oneDNN). The rows run in groups of at most 6 (12 accumulators, 2 weight vectors and a
// broadcast), k in blocks of kBlock lines (1 KB): the first group streams a block from DRAM, the
// others re-read it from L1 at once; a group's accumulators wait in memory between blocks. Each
// sum still runs over k in order. Against two 8-column passes over whole panels (the second from
// L2) on Zen 1: 1.16-1.25x at 7-16 rows (half the broadcasts per FMA, and the stream never waits
// a pass); blocks of 16 lines beat 8, 32, 64 and 256 (alternating processes, 2026-12-03).
constexpr int kGroupedRows = 7;     // from this many rows up
constexpr int64_t kBlock = 16;

template <int G, bool LEAD, typename W>
inline void group_block(const float* at_, int64_t MB, const W* w0, int64_t k0, int64_t k1, float* sums) {
  Vec16 acc[G];
  for (int i = 0; i < G; ++i) acc[i] = k0 == 0 ? Vec16::zero() : Vec16::load(sums + i * 16);
  for (int64_t k = k0; k < k1; ++k) {
    const W* q = w0 + k * 16;
    if constexpr (LEAD) prefetch(q + kPrefetchLines * 16);
    const Vec16 wv = Vec16::load(q);
    for (int i = 0; i < G; ++i) acc[i] = Vec16::fma(at_[k * MB + i], wv, acc[i]);
  }
  for (int i = 0; i < G; ++i) acc[i].store(sums + i * 16);
}

template <bool LEAD, typename W>
inline void group_block_rows(int g, const float* at_, int64_t MB, const W* w0, int64_t k0, int64_t k1,
                             float* sums) {
  switch (g) {  // groups of 7-16 rows split evenly into 2 or 3 groups: 3 to 6 rows
    case 3: return group_block<3, LEAD>(at_, MB, w0, k0, k1, sums);
    case 4: return group_block<4, LEAD>(at_, MB, w0, k0, k1, sums);
    case 5: return group_block<5, LEAD>(at_, MB, w0, k0, k1, sums);
    default: return group_block<6, LEAD>(at_, MB, w0, k0, k1, sums);
  }
}

template <int MB, typename W, typename O>
void grouped_panel_rows(const float* at_, const W* panels, int64_t K, int64_t N, O* out, int64_t ldo,
                        int64_t p0, int64_t p1) {
  constexpr int NG = (MB + 5) / 6;
  static_assert(MB >= kGroupedRows && MB <= 3 * 6, "groups of 3 to 6 rows");
  alignas(32) float sums[MB][16];
  for (int64_t p = p0; p < p1; ++p) {
    const W* w0 = panels + p * K * 16;
    for (int64_t k0 = 0; k0 < K; k0 += kBlock) {
      const int64_t k1 = std::min(K, k0 + kBlock);
      for (int g = 0, i0 = 0; g < NG; i0 += MB / NG + (g < MB % NG), ++g) {
        const int rows = MB / NG + (g < MB % NG);
        if (g == 0) group_block_rows<true>(rows, at_ + i0, MB, w0, k0, k1, sums[i0]);
        else group_block_rows<false>(rows, at_ + i0, MB, w0, k0, k1, sums[i0]);
      }
    }
    const int64_t col = p * 16;
    for (int i = 0; i < MB; ++i) store16(out + i * ldo + col, Vec16::load(sums[i]), N - col);
  }
}
#endif

#if defined(__AVX512BF16__)
// bfloat16 weights in k pairs ([P, K2, 16, 2], small_gemm_pack). DOT: bfloat16 rows, one
// vdpbf16ps per (row, panel, k pair): exact bf16 x bf16 products summed in float32 (half the
// instructions of widening to float32 FMAs, which made the batch-1 bf16 head loop compute-bound
// on AVX-512 CPUs that split a zmm FMA in two). Not DOT: float32 rows, each pair widened
// (exactly) to two float32 vectors and two FMAs, in k order as the unpaired kernel.
template <int MB, int NP, bool DOT, typename O>
void pair_panel_rows(const float* at_, const uint32_t* at2, const c10::BFloat16* panels,
                     int64_t K2, int64_t N, O* out, int64_t ldo, int64_t p0, int64_t p1) {
  const __m512i hi_mask = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int64_t p = p0; p < p1; p += NP) {
    const int np = static_cast<int>(std::min<int64_t>(NP, p1 - p));
    __m512 acc[MB][NP];
    for (int i = 0; i < MB; ++i)
      for (int j = 0; j < NP; ++j) acc[i][j] = _mm512_setzero_ps();
    const c10::BFloat16* w0 = panels + p * K2 * 32;
    auto step = [&](int j, int64_t kp) {
      const c10::BFloat16* q = w0 + (j * K2 + kp) * 32;
      prefetch(q + kPrefetchLines * 32);
      const __m512i wv = _mm512_loadu_si512(q);
      if constexpr (DOT) {
        for (int i = 0; i < MB; ++i)
          acc[i][j] = _mm512_dpbf16_ps(acc[i][j],
                                       (__m512bh)_mm512_set1_epi32(static_cast<int>(at2[kp * MB + i])),
                                       (__m512bh)wv);
      } else {
        const __m512 even = _mm512_castsi512_ps(_mm512_slli_epi32(wv, 16));
        const __m512 odd = _mm512_castsi512_ps(_mm512_and_si512(wv, hi_mask));
        for (int i = 0; i < MB; ++i) {
          acc[i][j] = _mm512_fmadd_ps(_mm512_set1_ps(at_[2 * kp * MB + i]), even, acc[i][j]);
          acc[i][j] = _mm512_fmadd_ps(_mm512_set1_ps(at_[(2 * kp + 1) * MB + i]), odd, acc[i][j]);
        }
      }
    };
    if (np == NP) {
      for (int64_t kp = 0; kp < K2; ++kp)
        for (int j = 0; j < NP; ++j) step(j, kp);
    } else {
      for (int j = 0; j < np; ++j)
        for (int64_t kp = 0; kp < K2; ++kp) step(j, kp);
    }
    for (int j = 0; j < np; ++j) {
      const int64_t col = (p + j) * 16;
      for (int i = 0; i < MB; ++i) store16(out + i * ldo + col, Vec16{acc[i][j]}, N - col);
    }
  }
}

// Rows x panels per register block for the paired kernel (MB * NP accumulators, NP weights).
template <int MB>
constexpr int pair_panels_per_block() { return MB <= 4 ? 4 : (MB <= 12 ? 2 : 1); }
#endif

template <int MB, typename W, typename O>
void run_rows(const float* at_, const W* panels, int64_t K, int64_t N, O* out, int64_t ldo) {
  constexpr int NP = panels_per_block<MB>();
  const int64_t P = (N + 15) / 16;
  at::parallel_for(0, P, 4, [&](int64_t p0, int64_t p1) {
#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
    if constexpr (MB >= kGroupedRows) return grouped_panel_rows<MB>(at_, panels, K, N, out, ldo, p0, p1);
#endif
    panel_rows<MB, NP>(at_, panels, K, N, out, ldo, p0, p1);
  });
}

// fn(std::integral_constant<int, M>{}) for the row count M in 1..kSmallGemmMaxRows: each kernel
// is instantiated per row count, so its accumulators are a fixed register block.
template <typename Fn>
void with_rows(int64_t M, Fn&& fn) {
  switch (M) {
#define ENGINE_ROWS(m) \
  case m:              \
    return fn(std::integral_constant<int, m>{});
    ENGINE_ROWS(1) ENGINE_ROWS(2) ENGINE_ROWS(3) ENGINE_ROWS(4) ENGINE_ROWS(5) ENGINE_ROWS(6)
    ENGINE_ROWS(7) ENGINE_ROWS(8) ENGINE_ROWS(9) ENGINE_ROWS(10) ENGINE_ROWS(11) ENGINE_ROWS(12)
    ENGINE_ROWS(13) ENGINE_ROWS(14) ENGINE_ROWS(15) ENGINE_ROWS(16)
#undef ENGINE_ROWS
    default:
      TORCH_CHECK(false, "engine native: small_gemm takes at most ", kSmallGemmMaxRows, " rows");
  }
}

template <typename W, typename O>
void dispatch_rows(int64_t M, const float* at_, const W* panels, int64_t K, int64_t N, O* out,
                   int64_t ldo) {
  with_rows(M, [&](auto rows) { run_rows<decltype(rows)::value>(at_, panels, K, N, out, ldo); });
}

#if defined(__AVX512BF16__)
template <bool DOT, typename O>
void dispatch_pair_rows(int64_t M, const float* at_, const uint32_t* at2,
                        const c10::BFloat16* panels, int64_t K2, int64_t N, O* out, int64_t ldo) {
  with_rows(M, [&](auto rows) {
    constexpr int MB = decltype(rows)::value;
    at::parallel_for(0, (N + 15) / 16, 4, [&](int64_t p0, int64_t p1) {
      pair_panel_rows<MB, pair_panels_per_block<MB>(), DOT>(at_, at2, panels, K2, N, out, ldo, p0, p1);
    });
  });
}

// bfloat16 rows as k pairs [K2, M]: the low half the even k (vdpbf16ps' operand order).
void pair_rows(const at::Tensor& a, int64_t K2, std::vector<uint32_t>& at2) {
  const int64_t M = a.size(0), K = a.size(1), lda = a.stride(0);
  const uint16_t* ap = reinterpret_cast<const uint16_t*>(a.data_ptr<c10::BFloat16>());
  at2.resize(static_cast<size_t>(K2 * M));
  for (int64_t i = 0; i < M; ++i) {
    const uint16_t* row = ap + i * lda;
    for (int64_t kp = 0; kp < K / 2; ++kp)
      at2[kp * M + i] = static_cast<uint32_t>(row[2 * kp]) | (static_cast<uint32_t>(row[2 * kp + 1]) << 16);
    if (K % 2) at2[(K / 2) * M + i] = row[K - 1];   // the pad k is zero
  }
}
#endif

template <typename A>
void transpose_rows(const at::Tensor& a, std::vector<float>& at_) {
  const int64_t M = a.size(0), K = a.size(1), lda = a.stride(0);
  const A* ap = a.data_ptr<A>();
  at_.resize(static_cast<size_t>(K * M));
  for (int64_t i = 0; i < M; ++i)
    for (int64_t k = 0; k < K; ++k) at_[k * M + i] = static_cast<float>(ap[i * lda + k]);
}

}  // namespace

at::Tensor small_gemm_run(const at::Tensor& a, const at::Tensor& panels, int64_t n,
                          const at::Tensor& out_in) {
  const int64_t M = a.size(0), K = a.size(1);
  TORCH_CHECK(a.dim() == 2 && a.stride(1) == 1, "engine native: small_gemm needs rows of A contiguous");
  TORCH_CHECK(M >= 1 && M <= kSmallGemmMaxRows, "engine native: small_gemm takes 1 to ",
              kSmallGemmMaxRows, " rows, got ", M);
  const bool paired = panels.dim() == 4;  // bfloat16 k pairs (small_gemm_pack)
  const int64_t K2 = (K + 1) / 2;
  TORCH_CHECK(panels.size(0) == (n + 15) / 16 &&
                  (paired ? panels.size(1) == K2 && panels.size(2) == 16 && panels.size(3) == 2 &&
                                panels.scalar_type() == at::kBFloat16
                          : panels.dim() == 3 && panels.size(1) == K && panels.size(2) == 16),
              "engine native: small_gemm panels ", panels.sizes(), " do not fit K=", K, ", N=", n);
  TORCH_CHECK(a.scalar_type() == at::kFloat || a.scalar_type() == at::kBFloat16,
              "engine native: small_gemm takes float32 or bfloat16 rows");
  at::Tensor out = out_in.defined() && out_in.scalar_type() == a.scalar_type() &&
                           out_in.size(0) >= M && out_in.size(1) == n && out_in.stride(1) == 1
                       ? out_in
                       : at::empty({M, n}, a.options());
  const int64_t ldo = out.stride(0);
  const bool wf = panels.scalar_type() == at::kFloat;
  TORCH_CHECK(wf || panels.scalar_type() == at::kBFloat16,
              "engine native: small_gemm weights must be float32 or bfloat16");
  thread_local std::vector<float> at_;
#if defined(__AVX512BF16__)
  if (paired) {
    const c10::BFloat16* w = panels.data_ptr<c10::BFloat16>();
    if (a.scalar_type() == at::kBFloat16) {
      thread_local std::vector<uint32_t> at2;
      pair_rows(a, K2, at2);
      dispatch_pair_rows<true>(M, nullptr, at2.data(), w, K2, n, out.data_ptr<c10::BFloat16>(), ldo);
    } else {
      transpose_rows<float>(a, at_);
      at_.resize(static_cast<size_t>(2 * K2 * M), 0.0f);  // the pad k (odd K) reads zeros
      dispatch_pair_rows<false>(M, at_.data(), nullptr, w, K2, n, out.data_ptr<float>(), ldo);
    }
    return out.size(0) == M ? out : out.narrow(0, 0, M);
  }
#else
  TORCH_CHECK(!paired, "engine native: paired bfloat16 panels need an AVX512-BF16 build");
#endif
  if (a.scalar_type() == at::kFloat)
    transpose_rows<float>(a, at_);
  else
    transpose_rows<c10::BFloat16>(a, at_);
  if (a.scalar_type() == at::kFloat) {
    float* o = out.data_ptr<float>();
    if (wf) dispatch_rows(M, at_.data(), panels.data_ptr<float>(), K, n, o, ldo);
    else dispatch_rows(M, at_.data(), panels.data_ptr<c10::BFloat16>(), K, n, o, ldo);
  } else {
    c10::BFloat16* o = out.data_ptr<c10::BFloat16>();
    if (wf) dispatch_rows(M, at_.data(), panels.data_ptr<float>(), K, n, o, ldo);
    else dispatch_rows(M, at_.data(), panels.data_ptr<c10::BFloat16>(), K, n, o, ldo);
  }
  // The head loop passes buffers of exactly M rows: skip the (dispatched) narrow, ~14 a step.
  return out.size(0) == M ? out : out.narrow(0, 0, M);
}

}  // namespace engine_native
