// Native CPU head loop of MAR's diffusion head (SimpleMLPAdaLN). See head_loop.h for the design.
//
// Numerics (float32): every elementwise expression is evaluated in the published operation order
// (modulate = y * (1 + scale) + shift, gate * mlp + residual, the DDPM step of `ddpm_update`), the
// build disables floating-point contraction (-ffp-contract=off) so no FMA changes a rounding, and
// exp (for SiLU and the variance) is torch's own vectorised Sleef exp where it is available.
// Products differ from the eager reference only by the GEMM's summation order.
#include "head_loop.h"
#include "small_gemm.h"

#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <sstream>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

// MKL (statically linked into libtorch_cpu, which exports these) and torch's Sleef. Declared weak:
// where a torch build lacks them they resolve to nullptr and the portable paths run instead.
// Integer arguments are passed as int64: correct for LP64 (int) and ILP64 MKL on x86-64/aarch64.
extern "C" {
size_t cblas_sgemm_pack_get_size(int64_t identifier, int64_t m, int64_t n, int64_t k)
    __attribute__((weak));
void cblas_sgemm_pack(int64_t layout, int64_t identifier, int64_t trans, int64_t m, int64_t n,
                      int64_t k, float alpha, const float* src, int64_t ld, float* dest)
    __attribute__((weak));
void cblas_sgemm_compute(int64_t layout, int64_t transa, int64_t transb, int64_t m, int64_t n,
                         int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
                         float beta, float* c, int64_t ldc) __attribute__((weak));
#if defined(__AVX512F__)
__m512 Sleef_expf16_u10(__m512) __attribute__((weak));
#endif
#if defined(__AVX2__)
__m256 Sleef_expf8_u10(__m256) __attribute__((weak));
#endif
}

namespace engine_native {
namespace {

constexpr int64_t kCblasRowMajor = 101, kCblasNoTrans = 111, kCblasTrans = 112,
                  kCblasPacked = 151, kCblasBMatrix = 162;
constexpr float kLnEps = 1e-6f;
constexpr int kBlock = 16;

bool mkl_packed_available() {
  return cblas_sgemm_pack_get_size != nullptr && cblas_sgemm_pack != nullptr &&
         cblas_sgemm_compute != nullptr;
}

const c10::OperatorHandle* find_op(const char* name) {
  auto handle = c10::Dispatcher::singleton().findSchema({name, ""});
  if (!handle.has_value()) return nullptr;
  return new c10::OperatorHandle(*handle);  // intentionally leaked: lives as long as the process
}

const c10::OperatorHandle* onednn_reorder_op() {
  static const c10::OperatorHandle* op = find_op("mkldnn::_reorder_linear_weight");
  return op;
}

const c10::OperatorHandle* onednn_linear_op() {
  static const c10::OperatorHandle* op = find_op("mkldnn::_linear_pointwise");
  return op;
}

// v[0..m) = exp(v[0..m)), m <= kBlock.
inline void exp_block(float* v, int m) {
#if defined(__AVX512F__)
  if (m == 16 && Sleef_expf16_u10 != nullptr) {
    _mm512_storeu_ps(v, Sleef_expf16_u10(_mm512_loadu_ps(v)));
    return;
  }
#endif
#if defined(__AVX2__)
  if (Sleef_expf8_u10 != nullptr) {
    while (m >= 8) {
      _mm256_storeu_ps(v, Sleef_expf8_u10(_mm256_loadu_ps(v)));
      v += 8;
      m -= 8;
    }
  }
#endif
  for (int k = 0; k < m; ++k) v[k] = std::exp(v[k]);
}

template <typename T>
inline float to_f(T v) { return static_cast<float>(v); }

// mean and 1/sqrt(var + eps) of one row (two passes, double accumulation).
inline void row_moments(const float* x, int64_t n, float& mean_out, float& rstd_out) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int k = 0; k < 8; ++k) acc[k] += x[j + k];
  double s = 0;
  for (int k = 0; k < 8; ++k) s += acc[k];
  for (; j < n; ++j) s += x[j];
  const double mean = s / static_cast<double>(n);
  double acc2[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  j = 0;
  for (; j + 8 <= n; j += 8)
    for (int k = 0; k < 8; ++k) {
      const double d = x[j + k] - mean;
      acc2[k] += d * d;
    }
  double s2 = 0;
  for (int k = 0; k < 8; ++k) s2 += acc2[k];
  for (; j < n; ++j) {
    const double d = x[j] - mean;
    s2 += d * d;
  }
  const float var = static_cast<float>(s2 / static_cast<double>(n));
  mean_out = static_cast<float>(mean);
  rstd_out = 1.0f / std::sqrt(std::max(var, 0.0f) + kLnEps);
}

// Rows per parallel task so that small passes stay on one thread.
inline int64_t row_grain(int64_t width) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, width)); }

}  // namespace

namespace {
at::Tensor onednn_product(const at::Tensor& a, const at::Tensor& packed) {
  torch::jit::Stack stack{c10::IValue(a), c10::IValue(packed), c10::IValue(),
                          c10::IValue(std::string("none")),
                          c10::IValue(c10::List<std::optional<at::Scalar>>()),
                          c10::IValue(std::string(""))};
  onednn_linear_op()->callBoxed(&stack);
  return stack[0].toTensor();
}

// The weight reordered for oneDNN, probed with one product so that an unsupported configuration
// (e.g. a CPU without the ISA oneDNN needs for this dtype) falls back now, not mid-sampling;
// undefined when it cannot.
at::Tensor onednn_reorder(const at::Tensor& weight, int64_t pack_rows) {
  const c10::OperatorHandle* reorder = onednn_reorder_op();
  if (reorder == nullptr || onednn_linear_op() == nullptr || weight.numel() == 0) return {};
  try {
    torch::jit::Stack stack{c10::IValue(weight), c10::IValue(pack_rows)};
    reorder->callBoxed(&stack);
    at::Tensor packed = stack[0].toTensor();
    onednn_product(at::zeros({1, weight.size(1)}, weight.options()), packed);
    return packed;
  } catch (const std::exception&) {
    return {};
  }
}
}  // namespace

bool onednn_bf16_native() {
  static const bool native =
      onednn_reorder(at::zeros({16, 16}, at::TensorOptions().dtype(at::kBFloat16)), 1).defined();
  return native;
}

// ---------------------------------------------------------------------------------------------
// Gemm

Gemm::Gemm(const at::Tensor& weight, GemmMode mode, int64_t pack_rows, int64_t stream_rows)
    : weight_(weight.contiguous()), mode_(mode), n_(weight.size(0)), k_(weight.size(1)) {
  weight_t_ = weight_.t();
  stream_rows_ = small_gemm_compiled() && n_ > 0 && k_ > 0
                     ? std::min<int64_t>(std::max<int64_t>(0, stream_rows), kSmallGemmMaxRows)
                     : 0;
  if (stream_rows_ > 0) panels_ = small_gemm_pack(weight_);
  pack_rows = std::max<int64_t>(1, pack_rows);
  if (mode_ == GemmMode::kMklPacked) {
    if (weight_.scalar_type() != at::kFloat || !mkl_packed_available() || n_ == 0 || k_ == 0) {
      mode_ = GemmMode::kAten;
    } else {
      // MKL's packing hint is kMklPackRows whatever pack_rows says (oneDNN's reorder hint):
      // measured best for every row count from 8 to 640 (see MklPackedLinear).
      const size_t bytes = cblas_sgemm_pack_get_size(kCblasBMatrix, kMklPackRows, n_, k_);
      packed_ = at::empty({static_cast<int64_t>(bytes) + 64}, weight_.options().dtype(at::kByte));
      cblas_sgemm_pack(kCblasRowMajor, kCblasBMatrix, kCblasTrans, kMklPackRows, n_, k_, 1.0f,
                       weight_.data_ptr<float>(), k_, reinterpret_cast<float*>(packed_.data_ptr()));
    }
  } else if (mode_ == GemmMode::kOneDnn || mode_ == GemmMode::kOneDnnWidened) {
    // Widened where asked (for tests on any CPU) or where oneDNN has no bf16 kernels.
    const bool widen = weight_.scalar_type() == at::kBFloat16 &&
                       (mode_ == GemmMode::kOneDnnWidened || !onednn_bf16_native());
    packed_ = onednn_reorder(widen ? weight_.to(at::kFloat) : weight_, pack_rows);
    mode_ = !packed_.defined() ? GemmMode::kAten : widen ? GemmMode::kOneDnnWidened : GemmMode::kOneDnn;
  }
}

at::Tensor Gemm::run(const at::Tensor& a, const at::Tensor& out) const {
  const int64_t m = a.size(0);
  if (m == 0) return out;
  if (m <= stream_rows_ && a.stride(1) == 1) return small_gemm_run(a, panels_, n_, out);
  switch (mode_) {
    case GemmMode::kMklPacked:
      cblas_sgemm_compute(kCblasRowMajor, kCblasNoTrans, kCblasPacked, m, n_, k_,
                          a.data_ptr<float>(), a.stride(0),
                          reinterpret_cast<const float*>(packed_.data_ptr()), k_, 0.0f,
                          out.data_ptr<float>(), out.stride(0));
      return out;
    case GemmMode::kOneDnn:
      return onednn_product(a, packed_);
    case GemmMode::kOneDnnWidened:
      return onednn_product(a.to(at::kFloat), packed_).to(a.scalar_type());
    case GemmMode::kAten:
    default: {
      at::Tensor o = out;
      at::mm_out(o, a, weight_t_);
      return o;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// HeadPlan

namespace {
enum TensorIndex {
  kTimeEmb = 0, kTable, kCondW, kCondB, kInW, kInB, kLnW, kLnB, kFc1W, kFc1B, kFc2W, kFc2B,
  kAdaW, kAdaB, kOutW, kOutB, kNumTensors
};

GemmMode to_mode(int64_t v) {
  TORCH_CHECK(v >= 0 && v <= 3, "engine native: bad GEMM mode ", v);
  return static_cast<GemmMode>(v);
}

const char* mode_name(GemmMode m) {
  switch (m) {
    case GemmMode::kMklPacked: return "mkl_packed";
    case GemmMode::kOneDnn: return "onednn";
    case GemmMode::kOneDnnWidened: return "onednn_widened";
    default: return "aten";
  }
}
}  // namespace

HeadPlan::HeadPlan(std::vector<at::Tensor> t, std::optional<std::vector<double>> clip_range,
                   bool bf16, int64_t gemm_mode, int64_t small_gemm_mode, int64_t mod_budget_bytes,
                   int64_t pack_rows, int64_t stream_rows) {
  TORCH_CHECK(t.size() == kNumTensors, "engine native: expected ", int(kNumTensors),
              " head tensors, got ", t.size());
  for (auto& v : t) {
    TORCH_CHECK(v.device().is_cpu(), "engine native: head tensors must be on the CPU");
    v = v.detach().to(at::kFloat).contiguous();
  }
  opts_.bf16 = bf16;
  opts_.gemm = to_mode(gemm_mode);
  opts_.small_gemm = to_mode(small_gemm_mode);
  opts_.mod_budget_bytes = std::max<int64_t>(1, mod_budget_bytes);
  opts_.stream_rows = small_gemm_compiled() ? std::min<int64_t>(std::max<int64_t>(0, stream_rows),
                                                                 kSmallGemmMaxRows)
                                            : 0;
  if (bf16 && opts_.gemm == GemmMode::kMklPacked) opts_.gemm = GemmMode::kAten;

  time_emb_ = t[kTimeEmb];
  table_ = t[kTable];
  num_steps_ = table_.size(0);
  TORCH_CHECK(table_.dim() == 2 && table_.size(1) == 7, "engine native: table must be [T, 7]");
  width_ = t[kInW].size(0);
  token_dim_ = t[kInW].size(1);
  cond_dim_ = t[kCondW].size(1);
  depth_ = t[kLnW].numel() == 0 ? 0 : t[kLnW].size(0);
  TORCH_CHECK(time_emb_.size(0) == num_steps_ && time_emb_.size(1) == width_,
              "engine native: time_emb must be [T, w]");
  TORCH_CHECK(t[kAdaW].size(0) == (3 * depth_ + 2) * width_ && t[kAdaW].size(1) == width_,
              "engine native: ada_weight must be [(3*depth+2)*w, w]");
  TORCH_CHECK(t[kOutW].size(0) == 2 * token_dim_, "engine native: out_weight must be [2C, w]");
  if (clip_range.has_value()) {
    TORCH_CHECK(clip_range->size() == 2, "engine native: clip_range must be (lo, hi)");
    clip_ = true;
    clip_lo_ = static_cast<float>((*clip_range)[0]);
    clip_hi_ = static_cast<float>((*clip_range)[1]);
  }

  cond_b_ = t[kCondB];
  in_b_ = t[kInB];
  ln_w_ = t[kLnW].reshape({depth_, width_});
  ln_b_ = t[kLnB].reshape({depth_, width_});
  fc1_b_ = t[kFc1B].reshape({depth_, width_});
  fc2_b_ = t[kFc2B].reshape({depth_, width_});
  ada_b_ = t[kAdaB];
  out_b_ = t[kOutB];

  const at::ScalarType big = bf16 ? at::kBFloat16 : at::kFloat;
  const int64_t sr = opts_.stream_rows;
  cond_ = Gemm(t[kCondW], opts_.gemm, pack_rows, sr);  // float32 weights in both modes
  in_ = Gemm(t[kInW], opts_.small_gemm, pack_rows, sr);
  out_ = Gemm(t[kOutW], opts_.small_gemm, pack_rows, sr);
  // bfloat16 weights: where the small-row kernel widens them to float32 FMAs, and against AMX,
  // oneDNN wins from 8 rows on (MAR-B head on a Xeon with AMX, one thread: 0.85x at 8 rows, 1.6x
  // at 2). The vdpbf16ps kernel (AVX512-BF16, no AMX) beat oneDNN up to 16 rows: MAR-B head
  // loops on a Zen 4, 2 threads, alternating processes: 1.3x at 8 rows, 1.0-1.2x at 2-4 and 12-16.
#if defined(__AMX_BF16__)
  constexpr bool bf16_small_rows = false;
#else
  const bool bf16_small_rows = small_gemm_bf16_dot();
#endif
  // Where oneDNN has no bf16 kernels its widened float32 product reads twice the bytes: the
  // small-row kernel (bf16 weights widened in registers) keeps every row count it takes.
  const int64_t big_sr =
      bf16 && !bf16_small_rows && onednn_bf16_native() ? std::min<int64_t>(sr, 4) : sr;
  ada_ = Gemm(t[kAdaW].to(big), opts_.gemm, pack_rows, big_sr);
  const at::Tensor fc1w = t[kFc1W].reshape({depth_, width_, width_});
  const at::Tensor fc2w = t[kFc2W].reshape({depth_, width_, width_});
  for (int64_t b = 0; b < depth_; ++b) {
    fc1_.emplace_back(fc1w[b].to(big), opts_.gemm, pack_rows, big_sr);
    fc2_.emplace_back(fc2w[b].to(big), opts_.gemm, pack_rows, big_sr);
  }
}

int64_t HeadPlan::chunk_steps(int64_t rows) const {
  const int64_t per_step = std::max<int64_t>(1, rows * (3 * depth_ + 2) * width_ *
                                                    (opts_.bf16 ? 2 : 4));
  return std::min<int64_t>(num_steps_, std::max<int64_t>(1, opts_.mod_budget_bytes / per_step));
}

std::string HeadPlan::describe() const {
  std::ostringstream s;
  s << "HeadPlan(depth=" << depth_ << ", width=" << width_ << ", C=" << token_dim_
    << ", D=" << cond_dim_ << ", T=" << num_steps_ << ", weights="
    << (opts_.bf16 ? "bfloat16" : "float32") << ", gemm=" << mode_name(ada_.mode())
    << ", small_gemm=" << mode_name(in_.mode()) << ", stream_rows=" << opts_.stream_rows
    << ", mod_budget=" << opts_.mod_budget_bytes
    << ", clip=" << (clip_ ? "yes" : "no") << ")";
  return s.str();
}

HeadPlan HeadPlan::retimed(const at::Tensor& time_emb, const at::Tensor& table) const {
  HeadPlan plan = *this;
  plan.time_emb_ = time_emb.detach().to(at::kFloat).contiguous();
  plan.table_ = table.detach().to(at::kFloat).contiguous();
  TORCH_CHECK(plan.time_emb_.device().is_cpu() && plan.table_.device().is_cpu(),
              "engine native: retimed tables must be on the CPU");
  TORCH_CHECK(plan.table_.dim() == 2 && plan.table_.size(1) == 7, "engine native: table must be [T, 7]");
  plan.num_steps_ = plan.table_.size(0);
  TORCH_CHECK(plan.time_emb_.dim() == 2 && plan.time_emb_.size(0) == plan.num_steps_ &&
                  plan.time_emb_.size(1) == width_,
              "engine native: time_emb must be [T, w]");
  return plan;
}

at::Tensor HeadPlan::run(const at::Tensor& z_in, const at::Tensor& x_in, const at::Tensor& noise_in,
                         const std::optional<at::Tensor>& cfg_in, const at::Tensor& temp_in) const {
  TORCH_CHECK(z_in.device().is_cpu() && x_in.device().is_cpu() && noise_in.device().is_cpu(),
              "engine native: tensors must be on the CPU");
  TORCH_CHECK(z_in.dim() == 2 && z_in.size(1) == cond_dim_, "engine native: z must be [R, ",
              cond_dim_, "], got ", z_in.sizes());
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == token_dim_, "engine native: x must be [n, ",
              token_dim_, "], got ", x_in.sizes());
  const int64_t rows = z_in.size(0), n = x_in.size(0);
  const bool use_cfg = cfg_in.has_value();
  TORCH_CHECK(rows == (use_cfg ? 2 * n : n), "engine native: z has ", rows, " rows for ", n,
              " tokens", use_cfg ? " with CFG" : "");
  TORCH_CHECK(noise_in.dim() == 3 && noise_in.size(0) == num_steps_ && noise_in.size(1) == rows &&
                  noise_in.size(2) == token_dim_,
              "engine native: noise must be [", num_steps_, ", ", rows, ", ", token_dim_, "], got ",
              noise_in.sizes());
  TORCH_CHECK(temp_in.device().is_cpu() && temp_in.dim() == 1 && temp_in.size(0) == n,
              "engine native: temperature must be a CPU tensor [", n, "], got ", temp_in.sizes());
  TORCH_CHECK(!use_cfg || (cfg_in->device().is_cpu() && cfg_in->dim() == 1 && cfg_in->size(0) == n),
              "engine native: cfg_scale must be a CPU tensor [", n, "], got ", cfg_in->sizes());
  at::NoGradGuard no_grad;
  const at::Tensor z = z_in.to(at::kFloat).contiguous();
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  const at::Tensor noise = noise_in.to(at::kFloat).contiguous();
  const at::Tensor temp = temp_in.to(at::kFloat).contiguous();
  const at::Tensor cfg = use_cfg ? cfg_in->to(at::kFloat).contiguous() : at::Tensor();
  if (n == 0) return x.clone().to(x_in.scalar_type());
  const float* cfgp = use_cfg ? cfg.data_ptr<float>() : nullptr;
  const float* tempp = temp.data_ptr<float>();
  at::Tensor result = opts_.bf16 ? run_impl<c10::BFloat16>(z, x, noise, cfgp, tempp)
                                 : run_impl<float>(z, x, noise, cfgp, tempp);
  return result.to(x_in.scalar_type());
}

template <typename T>
at::Tensor HeadPlan::run_impl(const at::Tensor& z, const at::Tensor& x_start,
                              const at::Tensor& noise, const float* cfgp,
                              const float* tempp) const {
  const int64_t R = z.size(0), n = x_start.size(0), C = token_dim_, w = width_, d = depth_;
  const int64_t NA = (3 * d + 2) * w, T_ = num_steps_;
  const bool use_cfg = cfgp != nullptr;
  const auto f32 = z.options().dtype(at::kFloat);
  const auto tT = z.options().dtype(c10::CppTypeToScalarType<T>::value);
  const int64_t grain = row_grain(w);

  // Buffers, allocated once per call.
  const int64_t S = chunk_steps(R);
  at::Tensor cemb = at::empty({R, w}, f32);
  at::Tensor ybuf = at::empty({S * R, w}, tT);
  at::Tensor modbuf =
      ada_.returns_new_output() ? at::Tensor() : at::empty({S * R, NA}, tT);
  at::Tensor h = at::empty({R, w}, f32);
  at::Tensor hx = at::empty({n, w}, f32);
  at::Tensor ubuf = at::empty({R, w}, tT);
  at::Tensor abuf = at::empty({R, w}, tT);
  at::Tensor fbuf = at::empty({R, w}, tT);
  at::Tensor ufin = at::empty({R, w}, f32);
  at::Tensor obuf = at::empty({R, 2 * C}, f32);
  at::Tensor x = x_start.clone();

  float* xp = x.data_ptr<float>();
  float* hp = h.data_ptr<float>();
  const float* noisep = noise.data_ptr<float>();
  const float* tab = table_.data_ptr<float>();
  const float* temb = time_emb_.data_ptr<float>();
  const float* adab = ada_b_.data_ptr<float>();

  // cond_embed(z) once, bias included (published: c_emb = Linear(z)).
  {
    cemb = cond_.run(z, cemb);  // oneDNN returns its own (contiguous) output
    float* cp = cemb.data_ptr<float>();
    const float* cb = cond_b_.data_ptr<float>();
    at::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t j = 0; j < w; ++j) cp[r * w + j] = cp[r * w + j] + cb[j];
    });
  }
  const float* cp = cemb.data_ptr<float>();

  for (int64_t k0 = 0; k0 < T_; k0 += S) {
    const int64_t sn = std::min(S, T_ - k0);
    // y = silu(t_emb[i] + c) for the chunk's steps, every row.
    T* yp = ybuf.data_ptr<T>();
    at::parallel_for(0, sn * R, grain, [&](int64_t q0, int64_t q1) {
      float v[kBlock], e[kBlock];
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t s = q / R, r = q % R, i = T_ - 1 - (k0 + s);
        const float* te = temb + i * w;
        const float* ce = cp + r * w;
        T* yo = yp + q * w;
        for (int64_t j0 = 0; j0 < w; j0 += kBlock) {
          const int m = static_cast<int>(std::min<int64_t>(kBlock, w - j0));
          for (int k = 0; k < m; ++k) {
            v[k] = te[j0 + k] + ce[j0 + k];
            e[k] = -v[k];
          }
          exp_block(e, m);
          for (int k = 0; k < m; ++k) yo[j0 + k] = static_cast<T>(v[k] / (1.0f + e[k]));
        }
      }
    });
    // Every adaLN modulation of the chunk in one GEMM (bias added where it is read).
    at::Tensor mod = ada_.run(ybuf.narrow(0, 0, sn * R),
                              modbuf.defined() ? modbuf.narrow(0, 0, sn * R) : at::Tensor());
    const T* modp_chunk = mod.data_ptr<T>();

    for (int64_t s = 0; s < sn; ++s) {
      const int64_t k = k0 + s, i = T_ - 1 - k;
      const T* modp = modp_chunk + s * R * NA;

      // h = input_proj(x); with CFG both halves read the same x: project once, copy.
      {
        at::Tensor p = in_.run(x, hx);
        const float* pp = p.data_ptr<float>();
        const float* ib = in_b_.data_ptr<float>();
        at::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) {
          for (int64_t r = r0; r < r1; ++r) {
            const float* src = pp + (r % n) * w;
            float* dst = hp + r * w;
            for (int64_t j = 0; j < w; ++j) dst[j] = src[j] + ib[j];
          }
        });
      }

      for (int64_t b = 0; b < d; ++b) {
        const int64_t off = 3 * w * b;
        const float* lw = ln_w_.data_ptr<float>() + b * w;
        const float* lb = ln_b_.data_ptr<float>() + b * w;
        const float* ash = adab + off;
        const float* asc = adab + off + w;
        const float* aga = adab + off + 2 * w;
        // u = LayerNorm(h) * (1 + scale) + shift
        T* up = ubuf.data_ptr<T>();
        at::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) {
          for (int64_t r = r0; r < r1; ++r) {
            const float* hr = hp + r * w;
            const T* mr = modp + r * NA + off;
            float mean, rstd;
            row_moments(hr, w, mean, rstd);
            const float nb = -mean * rstd;
            T* ur = up + r * w;
            for (int64_t j = 0; j < w; ++j) {
              const float y = (hr[j] * rstd + nb) * lw[j] + lb[j];
              const float shift = to_f(mr[j]) + ash[j];
              const float scale = to_f(mr[w + j]) + asc[j];
              ur[j] = static_cast<T>(y * (1.0f + scale) + shift);
            }
          }
        });
        // a = silu(fc1(u))
        at::Tensor a1 = fc1_[b].run(ubuf, abuf);
        {
          const T* ap = a1.data_ptr<T>();
          T* ao = abuf.data_ptr<T>();
          const float* b1 = fc1_b_.data_ptr<float>() + b * w;
          at::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) {
            float v[kBlock], e[kBlock];
            for (int64_t r = r0; r < r1; ++r) {
              const T* ar = ap + r * w;
              T* outr = ao + r * w;
              for (int64_t j0 = 0; j0 < w; j0 += kBlock) {
                const int m = static_cast<int>(std::min<int64_t>(kBlock, w - j0));
                for (int q = 0; q < m; ++q) {
                  v[q] = to_f(ar[j0 + q]) + b1[j0 + q];
                  e[q] = -v[q];
                }
                exp_block(e, m);
                for (int q = 0; q < m; ++q) outr[j0 + q] = static_cast<T>(v[q] / (1.0f + e[q]));
              }
            }
          });
        }
        // h = h + gate * fc2(a)
        at::Tensor f2 = fc2_[b].run(abuf, fbuf);
        {
          const T* fp = f2.data_ptr<T>();
          const float* b2 = fc2_b_.data_ptr<float>() + b * w;
          at::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) {
            for (int64_t r = r0; r < r1; ++r) {
              const T* fr = fp + r * w;
              const T* gr = modp + r * NA + off + 2 * w;
              float* hr = hp + r * w;
              for (int64_t j = 0; j < w; ++j) {
                const float gate = to_f(gr[j]) + aga[j];
                const float mlp = to_f(fr[j]) + b2[j];
                hr[j] = hr[j] + gate * mlp;
              }
            }
          });
        }
      }

      // Final layer: LayerNorm (no affine) * (1 + scale) + shift, then the output projection.
      {
        const int64_t off = 3 * w * d;
        const float* ash = adab + off;
        const float* asc = adab + off + w;
        float* uf = ufin.data_ptr<float>();
        at::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) {
          for (int64_t r = r0; r < r1; ++r) {
            const float* hr = hp + r * w;
            const T* mr = modp + r * NA + off;
            float mean, rstd;
            row_moments(hr, w, mean, rstd);
            const float nb = -mean * rstd;
            float* ur = uf + r * w;
            for (int64_t j = 0; j < w; ++j) {
              const float y = hr[j] * rstd + nb;
              const float shift = to_f(mr[j]) + ash[j];
              const float scale = to_f(mr[w + j]) + asc[j];
              ur[j] = y * (1.0f + scale) + shift;
            }
          }
        });
      }
      at::Tensor o = out_.run(ufin, obuf);
      const float* op = o.data_ptr<float>();
      const float* ob = out_b_.data_ptr<float>();

      // CFG combine + DDPM update of the n result rows (op order of engine.models.head.ddpm_update).
      const float* co = tab + i * 7;
      const float sqrt_recip = co[0], sqrt_recipm1 = co[1], coef1 = co[2], coef2 = co[3];
      const float min_log = co[4], max_log = co[5], nonzero = co[6];
      const float* nz = noisep + k * R * C;
      at::parallel_for(0, n, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, C)),
                       [&](int64_t r0, int64_t r1) {
        float std_dev[kBlock];
        for (int64_t r = r0; r < r1; ++r) {
          const float cfg = use_cfg ? cfgp[r] : 0.0f, temp = tempp[r];  // this row's settings
          const float* oc = op + r * 2 * C;
          const float* ou = op + (n + r) * 2 * C;
          float* xr = xp + r * C;
          const float* nr = nz + r * C;
          for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
            const int m = static_cast<int>(std::min<int64_t>(kBlock, C - c0));
            float mean_v[kBlock];
            for (int q = 0; q < m; ++q) {
              const int64_t c = c0 + q;
              float eps = oc[c] + ob[c];
              if (use_cfg) {
                const float eu = ou[c] + ob[c];
                eps = eu + cfg * (eps - eu);
              }
              const float v = oc[C + c] + ob[C + c];
              const float xv = xr[c];
              float x0 = sqrt_recip * xv - sqrt_recipm1 * eps;
              if (clip_) x0 = std::min(std::max(x0, clip_lo_), clip_hi_);
              mean_v[q] = coef1 * x0 + coef2 * xv;
              const float frac = (v + 1.0f) / 2.0f;
              const float logvar = frac * max_log + (1.0f - frac) * min_log;
              std_dev[q] = 0.5f * logvar;
            }
            exp_block(std_dev, m);
            for (int q = 0; q < m; ++q) {
              const int64_t c = c0 + q;
              xr[c] = mean_v[q] + nonzero * std_dev[q] * nr[c] * temp;
            }
          }
        }
      });
    }
  }
  return x;
}

template at::Tensor HeadPlan::run_impl<float>(const at::Tensor&, const at::Tensor&,
                                              const at::Tensor&, const float*, const float*) const;
template at::Tensor HeadPlan::run_impl<c10::BFloat16>(const at::Tensor&, const at::Tensor&,
                                                      const at::Tensor&, const float*,
                                                      const float*) const;

}  // namespace engine_native

// ---------------------------------------------------------------------------------------------
// Build capabilities (bound to Python in bindings.cpp)

namespace engine_native {

bool has_mkl_packed() { return mkl_packed_available(); }

MklPackedLinear::MklPackedLinear(const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(mkl_packed_available(), "MklPackedLinear: this torch build has no MKL packed GEMM");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat && weight.numel() > 0,
              "MklPackedLinear: a non-empty float32 [N, K] weight");
  const at::Tensor w = weight.contiguous();
  n_ = w.size(0);
  k_ = w.size(1);
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == n_, "MklPackedLinear: bias of ", n_, " values");
    bias_ = bias->to(at::kFloat).contiguous().clone();
  }
  const size_t bytes = cblas_sgemm_pack_get_size(kCblasBMatrix, kMklPackRows, n_, k_);
  packed_ = at::empty({static_cast<int64_t>(bytes) + 64}, w.options().dtype(at::kByte));
  cblas_sgemm_pack(kCblasRowMajor, kCblasBMatrix, kCblasTrans, kMklPackRows, n_, k_, 1.0f,
                   w.data_ptr<float>(), k_, reinterpret_cast<float*>(packed_.data_ptr()));
}

at::Tensor MklPackedLinear::run(const at::Tensor& x) const {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() >= 1 && x.size(-1) == k_,
              "MklPackedLinear: float32 input [..., ", k_, "]");
  const at::Tensor a = x.contiguous();
  const int64_t m = a.numel() / k_;
  std::vector<int64_t> shape(a.sizes().begin(), a.sizes().end());
  shape.back() = n_;
  at::Tensor out = at::empty(shape, a.options());
  if (m == 0) return out;
  float beta = 0.0f;
  if (bias_.defined()) {
    // Bias first, then C = A W^T + C: the order at::addmm (F.linear) uses, so the sums match it.
    out.view({m, n_}).copy_(bias_.view({1, n_}).expand({m, n_}));
    beta = 1.0f;
  }
  cblas_sgemm_compute(kCblasRowMajor, kCblasNoTrans, kCblasPacked, m, n_, k_, a.data_ptr<float>(),
                      k_, reinterpret_cast<const float*>(packed_.data_ptr()), k_, beta,
                      out.data_ptr<float>(), n_);
  return out;
}

bool has_small_gemm() { return small_gemm_compiled(); }

void exp_inplace(float* v, int64_t n) {
  for (int64_t i = 0; i < n; i += kBlock) exp_block(v + i, static_cast<int>(std::min<int64_t>(kBlock, n - i)));
}

bool has_sleef_exp() {
#if defined(__AVX512F__)
  if (Sleef_expf16_u10 != nullptr) return true;
#endif
#if defined(__AVX2__)
  if (Sleef_expf8_u10 != nullptr) return true;
#endif
  return false;
}

}  // namespace engine_native
