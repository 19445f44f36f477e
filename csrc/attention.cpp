// Bidirectional CPU attention (see attention.h for the design).
#include "attention.h"
#include "head_loop.h"  // exp_inplace
#include "vec16.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
// torch's Sleef exp, resolved where libtorch_cpu exports it (as in head_loop.cpp)
extern "C" __m512 Sleef_expf16_u10(__m512) __attribute__((weak));
#endif

namespace engine_native {
namespace {

#if defined(__AVX512F__)
inline bool has_sleef_exp16() { return Sleef_expf16_u10 != nullptr; }
#endif

#if defined(__AVX512F__)
constexpr int kRows = 8, kPanels = 2;  // 16 accumulators + 2 key vectors of the 32 zmm
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int kRows = 6, kPanels = 1;  // 6 accumulators: 12 of the 16 ymm, 2 for the key vector
#else
constexpr int kRows = 4, kPanels = 1;
#endif

struct Scratch {
  std::vector<float> keys, values, queries, scores;
  std::vector<uint32_t> key_pairs, value_pairs, query_pairs, score_pairs;  // bf16 x bf16 path
};

// scores[i][16p..16(p+NP)) = sum_d qt[d][i] * keys[p..p+NP)[d]: kRows x NP accumulators over D.
template <int NP>
inline void score_panels(const float* qt, const float* keys, int64_t D, int64_t p, float* s,
                         int64_t lds) {
  Vec16 acc[kRows][NP];
  for (int i = 0; i < kRows; ++i)
    for (int j = 0; j < NP; ++j) acc[i][j] = Vec16::zero();
  for (int64_t d = 0; d < D; ++d) {
    Vec16 w[NP];
    for (int j = 0; j < NP; ++j) w[j] = Vec16::load(keys + ((p + j) * D + d) * 16);
    for (int i = 0; i < kRows; ++i) {
      const float a = qt[d * kRows + i];
      for (int j = 0; j < NP; ++j) acc[i][j] = Vec16::fma(a, w[j], acc[i][j]);
    }
  }
  for (int i = 0; i < kRows; ++i)
    for (int j = 0; j < NP; ++j) acc[i][j].store(s + i * lds + (p + j) * 16);
}

// out[i][16c..16(c+NP)) = inv[i] * sum_j s[i][j] * values[j][16c..): kRows x NP accumulators over
// the keys; only the first `rows` rows and D columns are stored.
template <int NP, typename T>
inline void value_panels(const float* s, int64_t lds, const float* values, int64_t Lk, int64_t ldv,
                         int64_t c, const float* inv, T* out, int64_t D, int rows) {
  Vec16 acc[kRows][NP];
  for (int i = 0; i < kRows; ++i)
    for (int j = 0; j < NP; ++j) acc[i][j] = Vec16::zero();
  for (int64_t key = 0; key < Lk; ++key) {
    Vec16 w[NP];
    for (int j = 0; j < NP; ++j) w[j] = Vec16::load(values + key * ldv + (c + j) * 16);
    for (int i = 0; i < kRows; ++i) {
      const float a = s[i * lds + key];
      for (int j = 0; j < NP; ++j) acc[i][j] = Vec16::fma(a, w[j], acc[i][j]);
    }
  }
  for (int i = 0; i < rows; ++i)
    for (int j = 0; j < NP; ++j)  // inv * acc + 0: the one rounding of the product
      store16(out + i * D + (c + j) * 16, Vec16::fma(inv[i], acc[i][j], Vec16::zero()),
              D - (c + j) * 16);
}

// One (scaled) score row (lds = a multiple of 16 entries, those past the keys already -inf) ->
// its unnormalised softmax in place; returns 1 / sum. Partial maxima and sums in 16 lanes
// vectorise.
inline float softmax_row_passes(float* row, int64_t lds) {
  float part[16];
  std::fill(part, part + 16, -std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < lds; j += 16)
    for (int l = 0; l < 16; ++l) part[l] = std::max(part[l], row[j + l]);
  const float m = *std::max_element(part, part + 16);
  for (int64_t j = 0; j < lds; ++j) row[j] -= m;
  exp_inplace(row, lds);
  std::fill(part, part + 16, 0.f);
  for (int64_t j = 0; j < lds; j += 16)
    for (int l = 0; l < 16; ++l) part[l] += row[j + l];
  float sum = 0.f;
  for (int l = 0; l < 16; ++l) sum += part[l];
  return 1.f / sum;
}

#if defined(__AVX512F__)
// The same arithmetic in two passes instead of four (max; then subtract, exp, store and the
// lane sums in one): the same exp (Sleef's, 16 lanes), the same per-lane summation order, the
// same final sum over lanes, so bit for bit the result of softmax_row_passes. With `pairs`
// (bf16 P V) the probabilities are stored only as bf16 pairs, k2 of them, not as floats.
inline float lane_sum(__m512 acc) {
  alignas(64) float part[16];
  _mm512_store_ps(part, acc);
  float sum = 0.f;
  for (int l = 0; l < 16; ++l) sum += part[l];
  return sum;
}

inline float row_max(const float* row, int64_t lds) {
  __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < lds; j += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(row + j));
  return _mm512_reduce_max_ps(mx);
}

inline float softmax_row(float* row, int64_t lds) {
  if (!has_sleef_exp16()) return softmax_row_passes(row, lds);
  const __m512 m = _mm512_set1_ps(row_max(row, lds));
  __m512 acc = _mm512_setzero_ps();
  for (int64_t j = 0; j < lds; j += 16) {
    const __m512 e = Sleef_expf16_u10(_mm512_sub_ps(_mm512_loadu_ps(row + j), m));
    _mm512_storeu_ps(row + j, e);
    acc = _mm512_add_ps(acc, e);
  }
  return 1.f / lane_sum(acc);
}
#elif defined(__AVX2__) && defined(__FMA__)
// exp(x) for x <= 0 as torch's SDPA takes it in its CPU softmax (at::vec's exp_u20, which the
// published code's attention runs: x = n ln2 + r, a degree-5 polynomial of r, times 2^n; at most
// ~20 ulp; below ln(FLT_MIN), -inf included, 0). Its header version is compiled per CPU
// capability inside torch, so it is restated here. Against Sleef's u10 exp in a pass of its own:
// the kernel 1.15x at 320 keys on Zen 1 (exp was a fifth of its time).
inline __m256 exp_u20(__m256 x) {
  const __m256 ln_flt_min = _mm256_castsi256_ps(_mm256_set1_epi32(0xc2aeac50));
  const __m256 ln_flt_max = _mm256_castsi256_ps(_mm256_set1_epi32(0x42b17218));
  const __m256 log2e = _mm256_castsi256_ps(_mm256_set1_epi32(0x3fb8aa3b));
  const __m256 ln2 = _mm256_castsi256_ps(_mm256_set1_epi32(0x3f317218));
  const __m256 one = _mm256_set1_ps(1.f);
  const __m256 underflow = _mm256_cmp_ps(x, ln_flt_min, _CMP_LT_OS);
  x = _mm256_max_ps(_mm256_min_ps(x, ln_flt_max), ln_flt_min);
  const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, log2e, _mm256_set1_ps(0.5f)));
  const __m256 r = _mm256_fnmadd_ps(n, ln2, x);
  __m256 p = _mm256_fmadd_ps(r, _mm256_set1_ps(0.00828929059f), _mm256_set1_ps(0.0418978221f));
  p = _mm256_fmadd_ps(r, p, _mm256_set1_ps(0.166676521f));
  p = _mm256_fmadd_ps(r, p, _mm256_set1_ps(0.499991506f));
  p = _mm256_fmadd_ps(r, p, _mm256_set1_ps(0.999999701f));
  p = _mm256_fmadd_ps(r, p, one);
  // 2^(n-1) * 2: n = 128 (x near ln FLT_MAX) would overflow the exponent field
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(_mm256_sub_ps(n, one)),
                                                       _mm256_set1_epi32(127)), 23);
  const __m256 scale = _mm256_blendv_ps(_mm256_castsi256_ps(e), _mm256_setzero_ps(), underflow);
  return _mm256_mul_ps(_mm256_mul_ps(p, scale), _mm256_set1_ps(2.f));
}

// Two passes: the max; then subtract, exp, store and the lane sums in one.
inline float softmax_row(float* row, int64_t lds) {
  __m256 mx = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < lds; j += 8) mx = _mm256_max_ps(mx, _mm256_loadu_ps(row + j));
  alignas(32) float part[8];
  _mm256_store_ps(part, mx);
  const __m256 m = _mm256_set1_ps(*std::max_element(part, part + 8));
  __m256 acc = _mm256_setzero_ps();
  for (int64_t j = 0; j < lds; j += 8) {
    const __m256 e = exp_u20(_mm256_sub_ps(_mm256_loadu_ps(row + j), m));
    _mm256_storeu_ps(row + j, e);
    acc = _mm256_add_ps(acc, e);
  }
  _mm256_store_ps(part, acc);
  float sum = 0.f;
  for (int l = 0; l < 8; ++l) sum += part[l];
  return 1.f / sum;
}
#else
inline float softmax_row(float* row, int64_t lds) { return softmax_row_passes(row, lds); }
#endif

#if defined(__AVX512BF16__)
// bfloat16 q, k, v on CPUs with AVX512-BF16: both products as vdpbf16ps over pairs (exact
// bf16 x bf16 products, float32 sums), twice the float32 FMA rate. Scores, softmax and the
// 1 / sum stay float32; the probabilities enter P V rounded to bfloat16, as torch's bf16 flash
// attention does. Pairs are two bf16 in a uint32, the lower index in the low half.
inline uint32_t bf16_bits(float x) {
  return static_cast<uint32_t>(c10::BFloat16(x).x);
}
inline uint32_t bits(const c10::BFloat16& x) { return static_cast<uint32_t>(x.x); }
inline __m512bh as_bh(__m512i v) { return (__m512bh)v; }

// softmax_row, then the probabilities as k2 bf16 pairs.
inline float softmax_then_pairs(float* row, int64_t lds, uint32_t* r2, int64_t k2) {
  const float inv = softmax_row_passes(row, lds);
  int64_t kp = 0;
  for (; kp + 16 <= k2; kp += 16)
    _mm512_storeu_si512(r2 + kp, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(row + 2 * kp + 16),
                                                               _mm512_loadu_ps(row + 2 * kp)));
  for (; kp < k2; ++kp) r2[kp] = bf16_bits(row[2 * kp]) | (bf16_bits(row[2 * kp + 1]) << 16);
  return inv;
}

// The same values in two passes: exp, lane sums and the bf16 pairs in one, 32 keys at a time
// (masked stores keep to the k2 pairs of the row).
inline float softmax_row_to_pairs(const float* row, int64_t lds, uint32_t* r2, int64_t k2) {
  const __m512 m = _mm512_set1_ps(row_max(row, lds));
  __m512 acc = _mm512_setzero_ps();
  for (int64_t j = 0; j < lds; j += 32) {
    const __m512 e0 = Sleef_expf16_u10(_mm512_sub_ps(_mm512_loadu_ps(row + j), m));
    acc = _mm512_add_ps(acc, e0);
    __m512 e1 = _mm512_setzero_ps();
    if (j + 16 < lds) {
      e1 = Sleef_expf16_u10(_mm512_sub_ps(_mm512_loadu_ps(row + j + 16), m));
      acc = _mm512_add_ps(acc, e1);
    }
    const int64_t left = std::min<int64_t>(16, k2 - j / 2);
    const __mmask16 keep = left >= 16 ? static_cast<__mmask16>(0xFFFF)
                                      : static_cast<__mmask16>((1u << left) - 1u);
    _mm512_mask_storeu_epi32(r2 + j / 2, keep, (__m512i)_mm512_cvtne2ps_pbh(e1, e0));
  }
  return 1.f / lane_sum(acc);
}

template <int NP>
inline void score_panels_dp(const uint32_t* qp2, const uint32_t* keys2, int64_t D2, int64_t p,
                            float scale, float* s, int64_t lds) {
  __m512 acc[kRows][NP];
  for (int i = 0; i < kRows; ++i)
    for (int j = 0; j < NP; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D2; ++d) {
    __m512i w[NP];
    for (int j = 0; j < NP; ++j)
      w[j] = _mm512_loadu_si512(keys2 + ((p + j) * D2 + d) * 16);
    for (int i = 0; i < kRows; ++i) {
      const __m512i a = _mm512_set1_epi32(static_cast<int>(qp2[d * kRows + i]));
      for (int j = 0; j < NP; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], as_bh(a), as_bh(w[j]));
    }
  }
  const __m512 sc = _mm512_set1_ps(scale);
  for (int i = 0; i < kRows; ++i)
    for (int j = 0; j < NP; ++j)
      _mm512_storeu_ps(s + i * lds + (p + j) * 16, _mm512_mul_ps(acc[i][j], sc));
}

template <int NP>
inline void value_panels_dp(const uint32_t* s2, int64_t K2, const uint32_t* values2, int64_t Dp,
                            int64_t c, const float* inv, c10::BFloat16* out, int64_t D, int rows) {
  __m512 acc[kRows][NP];
  for (int i = 0; i < kRows; ++i)
    for (int j = 0; j < NP; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t kp = 0; kp < K2; ++kp) {
    __m512i w[NP];
    for (int j = 0; j < NP; ++j) w[j] = _mm512_loadu_si512(values2 + kp * Dp + (c + j) * 16);
    for (int i = 0; i < kRows; ++i) {
      const __m512i a = _mm512_set1_epi32(static_cast<int>(s2[i * K2 + kp]));
      for (int j = 0; j < NP; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], as_bh(a), as_bh(w[j]));
    }
  }
  for (int i = 0; i < rows; ++i)
    for (int j = 0; j < NP; ++j)
      store16(out + i * D + (c + j) * 16, Vec16{_mm512_mul_ps(_mm512_set1_ps(inv[i]), acc[i][j])},
              D - (c + j) * 16);
}

void attend_head_dp(const c10::BFloat16* q, int64_t sq, const c10::BFloat16* k, int64_t sk,
                    const c10::BFloat16* v, int64_t sv, c10::BFloat16* out, int64_t Lq,
                    int64_t Lk, int64_t D, float scale, Scratch& w) {
  const int64_t P = (Lk + 15) / 16, lds = P * 16, Dp = (D + 15) / 16 * 16;
  const int64_t D2 = (D + 1) / 2, K2 = (Lk + 1) / 2;
  // K in panels of 16 keys, pairs along the head width: [P, D2, 16] (zero past Lk and D). A
  // bf16 row read as uint32 already is its pairs (little-endian: the lower index in the low half).
  w.key_pairs.assign(P * D2 * 16, 0u);
  for (int64_t key = 0; key < Lk; ++key) {
    const c10::BFloat16* kr = k + key * sk;
    uint32_t* dst = w.key_pairs.data() + (key / 16) * D2 * 16 + key % 16;
    for (int64_t d = 0; d + 1 < D; d += 2) dst[(d / 2) * 16] = bits(kr[d]) | (bits(kr[d + 1]) << 16);
    if (D % 2) dst[(D / 2) * 16] = bits(kr[D - 1]);
  }
  // V as pairs of keys: [K2, Dp] (zero past Lk and D), 16 columns of two rows at a time.
  w.value_pairs.assign(K2 * Dp, 0u);
  const c10::BFloat16 zero_row[16] = {};
  for (int64_t kp = 0; kp < K2; ++kp) {
    const c10::BFloat16* v0 = v + 2 * kp * sv;
    const c10::BFloat16* v1 = 2 * kp + 1 < Lk ? v + (2 * kp + 1) * sv : nullptr;
    uint32_t* dst = w.value_pairs.data() + kp * Dp;
    int64_t d = 0;
    for (; d + 16 <= D; d += 16) {
      const __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v0 + d)));
      const __m512i hi = _mm512_cvtepu16_epi32(_mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(v1 != nullptr ? v1 + d : zero_row)));
      _mm512_storeu_si512(dst + d, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
    }
    for (; d < D; ++d) dst[d] = bits(v0[d]) | (v1 != nullptr ? bits(v1[d]) << 16 : 0u);
  }
  w.query_pairs.resize(D2 * kRows);
  w.score_pairs.resize(kRows * K2);
  w.scores.resize(kRows * lds);
  float* s = w.scores.data();
  for (int64_t r0 = 0; r0 < Lq; r0 += kRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kRows, Lq - r0));
    std::fill(w.query_pairs.begin(), w.query_pairs.end(), 0u);
    for (int i = 0; i < rows; ++i) {
      const c10::BFloat16* qr = q + (r0 + i) * sq;
      for (int64_t d = 0; d + 1 < D; d += 2)
        w.query_pairs[(d / 2) * kRows + i] = bits(qr[d]) | (bits(qr[d + 1]) << 16);
      if (D % 2) w.query_pairs[(D / 2) * kRows + i] = bits(qr[D - 1]);
    }
    int64_t p = 0;
    for (; p + kPanels <= P; p += kPanels)
      score_panels_dp<kPanels>(w.query_pairs.data(), w.key_pairs.data(), D2, p, scale, s, lds);
    for (; p < P; ++p) score_panels_dp<1>(w.query_pairs.data(), w.key_pairs.data(), D2, p, scale, s, lds);
    float inv[kRows];
    for (int i = 0; i < kRows; ++i) {
      float* row = s + i * lds;
      std::fill(row + Lk, row + lds, -std::numeric_limits<float>::infinity());
      // The row as bf16 (round to nearest even) is its pairs; past Lk the probabilities are
      // exp(-inf) = 0, and lds (a multiple of 16) covers the pad key of an odd Lk.
      uint32_t* r2 = w.score_pairs.data() + i * K2;
      inv[i] = has_sleef_exp16() ? softmax_row_to_pairs(row, lds, r2, K2)
                                 : softmax_then_pairs(row, lds, r2, K2);
    }
    c10::BFloat16* o = out + r0 * D;
    const int64_t C = Dp / 16;
    int64_t c = 0;
    for (; c + kPanels <= C; c += kPanels)
      value_panels_dp<kPanels>(w.score_pairs.data(), K2, w.value_pairs.data(), Dp, c, inv, o, D, rows);
    for (; c < C; ++c)
      value_panels_dp<1>(w.score_pairs.data(), K2, w.value_pairs.data(), Dp, c, inv, o, D, rows);
  }
}
#endif

template <typename T>
void attend_head(const T* q, int64_t sq, const T* k, int64_t sk, const T* v, int64_t sv, T* out,
                 int64_t Lq, int64_t Lk, int64_t D, float scale, Scratch& w) {
  const int64_t P = (Lk + 15) / 16, lds = P * 16, Dp = (D + 15) / 16 * 16;
#if defined(__AVX512BF16__)
  if constexpr (std::is_same<T, c10::BFloat16>::value)
    return attend_head_dp(q, sq, k, sk, v, sv, out, Lq, Lk, D, scale, w);
#endif
  w.keys.assign(P * D * 16, 0.f);  // zero keys past Lk: their scores are set to -inf below
  for (int64_t key = 0; key < Lk; ++key)
    for (int64_t d = 0; d < D; ++d)
      w.keys[((key / 16) * D + d) * 16 + key % 16] = static_cast<float>(k[key * sk + d]);
  // V rows as float32 of Dp columns: read in place when they already are (float32, D = Dp)
  const float* values;
  int64_t ldv = Dp;
  if (std::is_same<T, float>::value && D == Dp) {
    values = reinterpret_cast<const float*>(v);
    ldv = sv;
  } else {
    w.values.assign(Lk * Dp, 0.f);
    for (int64_t key = 0; key < Lk; ++key)
      for (int64_t d = 0; d < D; ++d) w.values[key * Dp + d] = static_cast<float>(v[key * sv + d]);
    values = w.values.data();
  }
  w.queries.resize(D * kRows);
  w.scores.resize(kRows * lds);
  float* s = w.scores.data();
  for (int64_t r0 = 0; r0 < Lq; r0 += kRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kRows, Lq - r0));
    for (int64_t d = 0; d < D; ++d)
      for (int i = 0; i < kRows; ++i)
        // q * scale first (exact for the power-of-two scales of head widths 4^n; SDPA's math
        // path scales the scores instead, one rounding apart otherwise)
        w.queries[d * kRows + i] = i < rows ? static_cast<float>(q[(r0 + i) * sq + d]) * scale : 0.f;
    int64_t p = 0;
    for (; p + kPanels <= P; p += kPanels) score_panels<kPanels>(w.queries.data(), w.keys.data(), D, p, s, lds);
    for (; p < P; ++p) score_panels<1>(w.queries.data(), w.keys.data(), D, p, s, lds);
    float inv[kRows];
    for (int i = 0; i < kRows; ++i) {
      std::fill(s + i * lds + Lk, s + (i + 1) * lds, -std::numeric_limits<float>::infinity());
      inv[i] = softmax_row(s + i * lds, lds);
    }
    T* o = out + r0 * D;
    const int64_t C = Dp / 16;
    int64_t c = 0;
    for (; c + kPanels <= C; c += kPanels)
      value_panels<kPanels>(s, lds, values, Lk, ldv, c, inv, o, D, rows);
    for (; c < C; ++c) value_panels<1>(s, lds, values, Lk, ldv, c, inv, o, D, rows);
  }
}

template <typename T>
void attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
            float scale) {
  const int64_t H = q.size(1), Lq = q.size(2), D = q.size(3), Lk = k.size(2);
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, q.size(0) * H, 1, [&](int64_t t0, int64_t t1) {
    thread_local Scratch w;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / H, h = t % H;
      attend_head(qp + b * q.stride(0) + h * q.stride(1), q.stride(2),
                  kp + b * k.stride(0) + h * k.stride(1), k.stride(2),
                  vp + b * v.stride(0) + h * v.stride(1), v.stride(2), op + t * Lq * D, Lq, Lk, D,
                  scale, w);
    }
  });
}

}  // namespace

bool attention_bf16_dot() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "engine native: attention takes q, k, v of shape [B, H, L, D]");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "engine native: attention runs on the CPU");
  const auto dtype = q.scalar_type();
  TORCH_CHECK((dtype == at::kFloat || dtype == at::kBFloat16) && k.scalar_type() == dtype &&
                  v.scalar_type() == dtype,
              "engine native: attention takes float32 or bfloat16 q, k, v of one dtype");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3) &&
                  v.sizes() == k.sizes(),
              "engine native: attention needs k and v of shape [B, H, Lk, D] matching q's B, H, D");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1,
              "engine native: attention needs unit stride along the head width");
  TORCH_CHECK(k.size(2) >= 1, "engine native: attention needs at least one key");
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  if (q.numel() == 0) return out;
  if (dtype == at::kFloat)
    attend<float>(q, k, v, out, static_cast<float>(scale));
  else
    attend<c10::BFloat16>(q, k, v, out, static_cast<float>(scale));
  return out;
}

}  // namespace engine_native
