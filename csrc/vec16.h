// Vec16: 16 float32 lanes as one zmm (AVX-512), two ymm (AVX2 + FMA) or a plain array the
// compiler vectorizes for whatever it has; the one vector type of the native kernels
// (small_gemm.cpp, attention.cpp). Loads widen bfloat16 to float32 exactly.
#pragma once

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

namespace engine_native {

#if defined(__AVX512F__)
struct Vec16 {
  __m512 v;
  static Vec16 zero() { return {_mm512_setzero_ps()}; }
  static Vec16 load(const float* p) { return {_mm512_loadu_ps(p)}; }
  static Vec16 load(const c10::BFloat16* p) {  // bfloat16 -> float32: the high half of a float
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))};
  }
  // acc + a * w, one rounding (fused), as every path here
  static Vec16 fma(float a, const Vec16& w, const Vec16& acc) {
    return {_mm512_fmadd_ps(_mm512_set1_ps(a), w.v, acc.v)};
  }
  void store(float* out) const { _mm512_storeu_ps(out, v); }
};
#elif defined(__AVX2__) && defined(__FMA__)
struct Vec16 {
  __m256 lo, hi;
  static Vec16 zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
  static Vec16 load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
  static __m256 widen8(const c10::BFloat16* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static Vec16 load(const c10::BFloat16* p) { return {widen8(p), widen8(p + 8)}; }
  static Vec16 fma(float a, const Vec16& w, const Vec16& acc) {
    const __m256 av = _mm256_set1_ps(a);
    return {_mm256_fmadd_ps(av, w.lo, acc.lo), _mm256_fmadd_ps(av, w.hi, acc.hi)};
  }
  void store(float* out) const {
    _mm256_storeu_ps(out, lo);
    _mm256_storeu_ps(out + 8, hi);
  }
};
#else
struct Vec16 {
  float v[16];
  static Vec16 zero() { return {}; }
  template <typename W>
  static Vec16 load(const W* p) {
    Vec16 r;
    for (int j = 0; j < 16; ++j) r.v[j] = static_cast<float>(p[j]);
    return r;
  }
  static Vec16 fma(float a, const Vec16& w, const Vec16& acc) {
    Vec16 r;
    for (int j = 0; j < 16; ++j) r.v[j] = std::fma(a, w.v[j], acc.v[j]);
    return r;
  }
  void store(float* out) const {
    for (int j = 0; j < 16; ++j) out[j] = v[j];
  }
};
#endif

// The first `left` of the 16 lanes into out (float32, or bfloat16 rounded to nearest even).
template <typename O>
inline void store16(O* out, const Vec16& v, int64_t left) {
  if (std::is_same<O, float>::value && left >= 16) {
    v.store(reinterpret_cast<float*>(out));
    return;
  }
  alignas(64) float tmp[16];
  v.store(tmp);
  for (int64_t j = 0; j < std::min<int64_t>(16, left); ++j) out[j] = static_cast<O>(tmp[j]);
}

}  // namespace engine_native
