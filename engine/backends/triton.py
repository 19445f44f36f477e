"""Triton head backend: the whole diffusion loop of one MAR step in fused GPU kernels.

Per MAR step (head_loop call): cond_embed(z) once.               1 launch
Per diffusion step:  all adaLN modulations, silu(t_emb[i] + c) @ W_ada^T + b, one GEMM;
                     input_proj of x (the n distinct rows only, also under CFG);
                     one launch per ResBlock (engine/kernels/head_block.py);
                     final layer + CFG + DDPM update.            depth + 3 launches
Every launch is a torch.library custom op, so a head loop traces under torch.compile.
Runs on CUDA tensors, or on CPU tensors in Triton's interpreter (TRITON_INTERPRET=1, tests).
Triton is imported lazily: importing this module never touches triton or a device.
"""
from __future__ import annotations

import os
from types import SimpleNamespace

import torch

from ..core.errors import ConfigError
from .base import HeadBackend
from ..ops.head import row_param

_WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class TritonBackend(HeadBackend):
    name = "triton"
    graph_safe = True

    def __init__(self, weight_dtype: torch.dtype = torch.float32):
        if weight_dtype not in _WEIGHT_DTYPES:
            raise ConfigError(f"weight_dtype must be one of {_WEIGHT_DTYPES}, got {weight_dtype}")
        self.weight_dtype = weight_dtype
        self._head = None
        self._w = self._ops = None

    # Availability --------------------------------------------------------------------------
    def _why_not(self, device) -> str | None:
        device = torch.device(device)
        if device.type not in ("cuda", "cpu"):
            return f"the Triton kernels run on CUDA devices, not {device.type}"
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return ("on CPU the Triton kernels only run in Triton's interpreter: set "
                    "TRITON_INTERPRET=1 before triton is imported (slow; meant for tests)")
        try:
            import triton  # noqa: F401
        except Exception as exc:  # not installed, or broken install
            return f"triton cannot be imported: {exc}"
        if device.type == "cuda":
            if not torch.cuda.is_available():
                return "CUDA is not available"
            if torch.cuda.get_device_capability(device) < (8, 0):
                return "Triton needs an NVIDIA GPU of compute capability 8.0 or newer"
        else:
            from ..kernels import linear_epilogue as mod
            if type(mod._linear_kernel).__name__ != "InterpretedFunction":
                return ("the kernels were imported before TRITON_INTERPRET=1 was set, so they "
                        "cannot run on CPU in this process")
        return None

    def available(self, device) -> bool:
        return self._why_not(device) is None

    def unavailable_reason(self, device) -> str:
        return self._why_not(device) or "available"

    # Packing -------------------------------------------------------------------------------
    def prepare(self, head) -> None:
        """Pack once: matrices in weight_dtype (no copy for fp32), everything else fp32."""
        from ..kernels.head_block import final_ddpm, resblock, ticket_counters
        from ..kernels.linear_epilogue import PRO_SILU, linear_epilogue

        def mat(t):
            return t.detach().to(self.weight_dtype).contiguous()

        def vec(t):
            return t.detach().float().contiguous()

        base = head.weights
        if head is not base:   # a retimed head (fast "disa"): the base's packed weights, its own tables
            if getattr(self, "_base", None) is not base:
                self.prepare(base)
            variants = self._variants
            if id(head) not in variants or variants[id(head)][0] is not head:
                variants[id(head)] = (head, SimpleNamespace(**{**vars(self._base_w), "time_emb": vec(head.time_emb),
                                                               "table": vec(head.table), "steps": head.num_steps}))
            self._w, self._head = variants[id(head)][1], head
            return
        if getattr(self, "_base", None) is head:   # packed already: back from a retimed head
            self._w, self._head = self._base_w, head
            return
        d = head.depth
        self._w = SimpleNamespace(
            cond_w=mat(head.cond_weight), cond_b=vec(head.cond_bias),
            in_w=mat(head.in_weight), in_b=vec(head.in_bias),
            ada_w=mat(head.ada_weight), ada_b=vec(head.ada_bias),
            blocks=[(vec(head.ln_weight[k]), vec(head.ln_bias[k]), mat(head.fc1_weight[k]),
                     vec(head.fc1_bias[k]), mat(head.fc2_weight[k]), vec(head.fc2_bias[k]))
                    for k in range(d)],
            out_w=mat(head.out_weight), out_b=vec(head.out_bias),
            time_emb=vec(head.time_emb), table=vec(head.table),
            clip=head.clip_range or (None, None), width=head.width, steps=head.num_steps)
        # The custom ops, kept here so head_loop has no imports (cleaner torch.compile traces).
        self._ops = SimpleNamespace(linear=linear_epilogue, silu=PRO_SILU, resblock=resblock,
                                    final=final_ddpm)
        ticket_counters(head.in_weight.device)   # not lazily inside a CUDA-graph capture
        self._head = self._base = head
        self._base_w, self._variants = self._w, {}

    # The loop ------------------------------------------------------------------------------
    @torch.no_grad()
    def head_loop(self, head, z, x, noise, cfg_scale, temperature):
        if self._head is not head:
            self.prepare(head)
        w, ops = self._w, self._ops
        W, T = w.width, w.steps
        # Per-row float32 [n] once per MAR step (numbers: a device fill, no host copy).
        n = x.shape[0]
        cfg = row_param(cfg_scale, "cfg_scale", n, z.device, optional=True, as_tensor=True)
        temperature = row_param(temperature, "temperature", n, z.device, as_tensor=True)
        c = ops.linear(z.float().contiguous(), w.cond_w, w.cond_b)   # once per MAR step
        x = x.float().contiguous()
        for k in range(T):
            i = T - 1 - k   # noise[k] belongs to diffusion index T-1-k
            mods = ops.linear(c, w.ada_w, w.ada_b, w.time_emb[i], ops.silu)
            h = ops.linear(x, w.in_w, w.in_b)   # n rows; block 0 reads row r % n
            for b, (lnw, lnb, w1, b1, w2, b2) in enumerate(w.blocks):
                h = ops.resblock(h, mods[:, 3 * W * b:3 * W * (b + 1)], lnw, lnb, w1, b1, w2, b2)
            x = ops.final(h, mods[:, 3 * W * len(w.blocks):], w.out_w, w.out_b, x, noise[k],
                           w.table[i], cfg, temperature, w.clip[0], w.clip[1])
        return x
