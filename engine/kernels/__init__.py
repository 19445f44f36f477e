"""Triton kernels of the engine (installed as engine.kernels).

One module per op, each with its kernel, host launcher, `torch.library.custom_op` wrapper
(`engine::<name>`, with a fake implementation) and a plain-torch reference:
  modulated_layernorm  LN(h) * (1 + scale) + shift, per-row modulation
  linear_epilogue      x @ W^T + b with SiLU prologue (+ time-embedding row) / SiLU or
                       gate-residual epilogues
  ddpm_update          CFG + one reverse DDPM step
  head_block           fused ResBlock and fused final layer + DDPM step (the head loop's kernels)
  categorical_sample   CFG + temperature + top-k / top-p + the exponential-race draw of one
                       decode step (ELM's categorical sampling)
  aot_report           ahead-of-time compile for sm_80/sm_90: registers, spills, shared memory
Importing this package does not import triton; the modules do.
"""
