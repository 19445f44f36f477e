"""The fused categorical sampling kernel (engine.kernels.categorical_sample) as the causal
families call it: whether it can run on a device, and sample_logits (engine.ops.categorical) in
one launch. Importing this module imports neither triton nor the kernels."""
from __future__ import annotations

import torch


def fused_unavailable_reason(device) -> str | None:
    """Why the fused sampling kernel (engine.kernels.categorical_sample) cannot run on
    `device`, or None when it can: CUDA with Triton (compute capability 8.0+), or CPU in
    Triton's interpreter (tests). Asked at run time; importing this module touches no device."""
    from .triton import TritonBackend

    device = torch.device(device)
    backend = TritonBackend()
    if not backend.available(device):
        return backend.unavailable_reason(device)
    if device.type == "cpu":
        from ..kernels import categorical_sample as module
        if type(module._categorical_kernel).__name__ != "InterpretedFunction":
            return "the kernel was imported before TRITON_INTERPRET=1 was set"
    return None


def sample_logits_fused(logits, noise, scale, temperature, top_k=None, top_p=None, want_logits=True):
    """sample_logits in one fused kernel: (indices [B, T], filtered logits [B, T, V] or an
    empty tensor without want_logits, ok [B, T]: the row's probabilities are finite). `scale`
    and `temperature`: 0-d or per-image [B] tensors (a number becomes a 0-d tensor here)."""
    from ..kernels.categorical_sample import categorical_sample

    if not isinstance(temperature, torch.Tensor):
        temperature = torch.full((), float(temperature), dtype=torch.float32, device=logits.device)
    return categorical_sample(logits, noise, scale, temperature, top_k, top_p, want_logits)
