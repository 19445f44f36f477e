// Native CPU head loop of MAR's diffusion head (SimpleMLPAdaLN): declarations.
//
// One `HeadPlan::run` call runs a MAR step's whole reverse-diffusion loop for its rows:
//   * cond_embed(z) once per call, time embeddings read from the packed table;
//   * the adaLN modulations of every block and of the final layer for a chunk of diffusion steps in
//     ONE GEMM (they depend on (step, row) only, never on x): silu(t_emb[i] + c) @ ada^T;
//   * per diffusion step: input projection (computed once for the shared half under CFG), per block
//     fused modulated LayerNorm -> fc1 -> fused bias+SiLU -> fc2 -> fused bias+gate+residual, final
//     fused LayerNorm+modulation -> output projection -> fused CFG combine + DDPM update;
//   * products of at most 16 rows (batch 1) through the small-row kernel of small_gemm.h, which
//     reads each weight once for all rows; larger ones through MKL's packed sgemm (the float32
//     default on Intel CPUs), oneDNN's matmul on weights reordered once (bf16, and float32
//     elsewhere: 2-3x MKL's AVX2 code on an AMD EPYC) or at::mm; elementwise
//     passes parallel across rows with at::parallel_for (OpenMP).
//   * the Python binding lives in bindings.cpp: only it parses torch/extension.h (pybind11), and
//     the two files compile in parallel (first-use build ~32 s instead of ~35 s on 2 cores).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <vector>

namespace engine_native {

// How one weight matrix W [N, K] is multiplied: out[M, N] = A[M, K] @ W^T.
enum class GemmMode : int {
  kAten = 0,       // at::mm_out (MKL sgemm for float32, oneDNN for bfloat16)
  kMklPacked = 1,  // MKL cblas_sgemm_compute on weights packed once (float32 only)
  kOneDnn = 2,     // oneDNN matmul on weights reordered once (mkldnn::_linear_pointwise)
  // bf16 weights on a CPU whose oneDNN has no bf16 kernels (AVX2 only, where ATen's bf16 mm runs
  // at a fifth of the float32 rate): oneDNN's float32 product of the bf16 values, rounded once
  // to bf16 (the sums a bf16 kernel forms). kOneDnn becomes it there; asking for it widens bf16
  // on any CPU (float32 weights: kOneDnn).
  kOneDnnWidened = 3,
};

class Gemm {
 public:
  Gemm() = default;
  // stream_rows: products of at most that many rows (<= kSmallGemmMaxRows) use the small-row
  // kernel (small_gemm.h) on weights packed once into panels; 0 = never.
  Gemm(const at::Tensor& weight, GemmMode mode, int64_t pack_rows, int64_t stream_rows = 0);
  // Returns the product: `out` itself, or (oneDNN) a new tensor of the same shape.
  at::Tensor run(const at::Tensor& a, const at::Tensor& out) const;
  GemmMode mode() const { return mode_; }
  bool returns_new_output() const { return mode_ == GemmMode::kOneDnn || mode_ == GemmMode::kOneDnnWidened; }
  int64_t n() const { return n_; }
  int64_t k() const { return k_; }

 private:
  at::Tensor weight_;   // [N, K] contiguous, the GEMM dtype
  at::Tensor weight_t_; // its transpose view [K, N]
  at::Tensor packed_;   // MKL packed bytes, or the oneDNN (mkldnn layout) weight
  at::Tensor panels_;   // the small-row kernel's layout (when stream_rows_ > 0)
  GemmMode mode_ = GemmMode::kAten;
  int64_t n_ = 0, k_ = 0, stream_rows_ = 0;
};

struct PlanOptions {
  bool bf16 = false;               // fc1/fc2/adaLN weights and activations in bfloat16
  GemmMode gemm = GemmMode::kAten; // fc1/fc2/adaLN and cond_embed (the large products)
  GemmMode small_gemm = GemmMode::kAten; // input/output projections (K or N = 2C: tiny)
  int64_t mod_budget_bytes = 32 << 20;   // modulation buffer size that bounds the step chunk
  int64_t stream_rows = 0;               // products of <= this many rows: small-row kernel
};

class HeadPlan {
 public:
  HeadPlan(std::vector<at::Tensor> tensors, std::optional<std::vector<double>> clip_range,
           bool bf16, int64_t gemm_mode, int64_t small_gemm_mode, int64_t mod_budget_bytes,
           int64_t pack_rows, int64_t stream_rows);

  // z [R, D], x [n, C], noise [T, R, C]; R = 2n with CFG (cfg_scale given), else n. -> [n, C]
  // cfg_scale and temperature: float32 [n], one value per result row.
  at::Tensor run(const at::Tensor& z, const at::Tensor& x, const at::Tensor& noise,
                 const std::optional<at::Tensor>& cfg_scale, const at::Tensor& temperature) const;

  std::string describe() const;
  int64_t width() const { return width_; }
  int64_t depth() const { return depth_; }
  int64_t token_dim() const { return token_dim_; }
  int64_t num_steps() const { return num_steps_; }
  int64_t chunk_steps(int64_t rows) const;
  // The same packed weights (shared: the Gemms hold tensor handles) with another respacing's
  // time rows [T', w] and coefficient table [T', 7] (DiSA's per-step diffusion schedules).
  HeadPlan retimed(const at::Tensor& time_emb, const at::Tensor& table) const;

 private:
  template <typename T>
  at::Tensor run_impl(const at::Tensor& z, const at::Tensor& x, const at::Tensor& noise,
                      const float* cfg, const float* temperature) const;  // cfg: nullptr = none

  int64_t width_, depth_, token_dim_, cond_dim_, num_steps_;
  PlanOptions opts_;
  bool clip_ = false;
  float clip_lo_ = 0.f, clip_hi_ = 0.f;
  at::Tensor time_emb_;  // [T, w] float32
  at::Tensor table_;     // [T, 7] float32
  at::Tensor cond_b_, in_b_, ln_w_, ln_b_, fc1_b_, fc2_b_, ada_b_, out_b_;  // float32
  Gemm cond_, in_, out_, ada_;
  std::vector<Gemm> fc1_, fc2_;
};

// What this build can use (reported by the Python side's describe()).
bool has_mkl_packed();
// Whether this CPU's oneDNN multiplies bf16 itself (its reorder refuses bf16 weights otherwise).
bool onednn_bf16_native();

// A linear layer on MKL packed weights, for the transformer (engine.packed_linear): any number
// of rows. MKL's packed buffer is only valid where it was written (a copy computes garbage), so it
// stays inside this object. x [..., K] float32 -> [..., N] = x @ W^T + bias.
constexpr int64_t kMklPackRows = 640;  // MKL's packing hint; measured best from 8 to 640 rows

class MklPackedLinear {
 public:
  MklPackedLinear(const at::Tensor& weight, const std::optional<at::Tensor>& bias);
  at::Tensor run(const at::Tensor& x) const;
  int64_t n() const { return n_; }
  int64_t k() const { return k_; }

 private:
  at::Tensor packed_, bias_;
  int64_t n_ = 0, k_ = 0;
};
bool has_sleef_exp();
// v[0..n) = exp(v[0..n)): torch's vectorised Sleef exp (1 ulp) where it is available, else std::exp.
void exp_inplace(float* v, int64_t n);
bool has_small_gemm();

}  // namespace engine_native
