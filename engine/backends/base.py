"""The interface every head backend implements: run one MAR step's whole diffusion loop."""
from __future__ import annotations

import torch

from ..ops.head import PackedHead


class HeadBackend:
    """A backend turns the conditions of the rows predicted in one MAR step into tokens.

    `head_loop(head, z, x, noise, cfg_scale, temperature)`:
      z      [R, D]  decoder outputs of the rows; with CFG R = 2n, rows [cond; uncond]
      x      [n, C]  start noise
      noise  [T, R, C] the per-diffusion-step noise, in the order it is drawn (index T-1 first)
      cfg_scale  None (no CFG: R = n), a number, or a float32 tensor [n]: one guidance scale
                 per result row (R = 2n); row r's eps = eps_u + cfg[r] * (eps_c - eps_u)
      temperature  a number, or a float32 tensor [n]: one noise scale per result row
    returns [n, C]. A tensor of equal values gives bit-for-bit the result of that number (numbers
    are rounded to float32 either way), so rows with different settings can share one call.
    Tensors should already be on z's device (a host copy would break CUDA-graph capture). Every backend reads the same tables and noise, so all give the same tokens
    up to float rounding (float32) or to their documented precision (bf16 / fp16 weights).
    """

    name = "base"
    # Whether head_loop may be captured in a CUDA graph: no host syncs, no allocations whose
    # size depends on data, no host-to-device copies of fresh host memory.
    graph_safe = False
    # Whether the model should also run its transformer blocks' products on weights packed once
    # (engine.ops.packed_linear: CPU float32 on MKL's packed sgemm, F.linear's sums; bf16 on oneDNN).
    # The reference backend must not:
    # it is the operation-for-operation baseline.
    packs_transformer = False

    def available(self, device: torch.device) -> bool:
        """Whether this backend can run on `device` now (checked lazily, never at import)."""
        return True

    def unavailable_reason(self, device: torch.device) -> str:
        return "not available"

    def prepare(self, head: PackedHead) -> None:
        """Called once when a model is bound to this backend (pack or convert weights)."""

    def head_loop(self, head: PackedHead, z, x, noise, cfg_scale, temperature) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"
