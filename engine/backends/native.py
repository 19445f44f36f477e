"""Native CPU backend: one C++ call (csrc/head_loop.cpp) runs a MAR step's whole diffusion loop.

The extension is compiled lazily on first use (`engine.native.build`), never at import. When it
cannot be built, `available()` is False and `unavailable_reason()` names the cause; "auto" then
falls back to the reference backend with one RuntimeWarning, and asking for "native" by name
raises ConfigError (see engine.backends.get_backend).

What the native loop does differently from the eager reference (same math, same op order):
  * cond_embed(z) once per call instead of once per diffusion step; time embeddings from the
    packed per-step table instead of the timestep MLP;
  * every adaLN modulation of a chunk of diffusion steps in ONE GEMM: they depend on the step and
    the row only (silu(t_emb[i] + c) @ ada^T), never on x, so for few rows the 20*w x w adaLN
    weight is streamed once per chunk instead of once per step (the chunk is bounded by
    `mod_budget_bytes` of modulations);
  * with CFG the input projection of the shared half once; only the n result rows get the update;
  * LayerNorm + modulation, bias + SiLU, bias + gate + residual, CFG combine + DDPM update each
    fused into one pass over the rows, parallel across rows (OpenMP).

Options:
  weight_dtype  torch.float32 (default: keeps the published tokens) or torch.bfloat16 (fc1/fc2/adaLN
                weights and their activations in bfloat16; tokens then differ at bf16 precision).
  gemm          "auto", "aten" (MKL sgemm via at::mm), "mkl_packed" (MKL packed weights, float32),
                "onednn" (oneDNN with reordered weights) for the large products.
  stream_rows   products of at most this many rows (0-16; default 16) go through the small-row
                kernel (csrc/small_gemm.cpp: each weight read once for all rows, the batch-1
                case, where MKL and oneDNN reach a third to a half of the memory bandwidth);
                0 = never. Builds without AVX-512 or AVX2 + FMA (the portable kernel) never
                use it.
"""
from __future__ import annotations

import threading
import warnings
import weakref

import torch

from ..ops import packed_linear
from ..core.errors import ConfigError
from .base import HeadBackend
from ..ops.head import row_param

# "onednn_widened": bf16 weights as oneDNN float32 products of their values, rounded to bf16 —
# what "onednn" becomes on a CPU whose oneDNN has no bf16 kernels; asked for, on any CPU.
GEMM_MODES = {"aten": 0, "mkl_packed": 1, "onednn": 2, "onednn_widened": 3}
WEIGHT_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}
DEFAULT_MOD_BUDGET = 32 << 20
DEFAULT_STREAM_ROWS = 16   # products of at most this many rows: csrc/small_gemm.cpp (SIMD builds)

_warned = False
_warn_lock = threading.Lock()


def fallback_warning(cause: str) -> None:
    """One RuntimeWarning per process when "auto" cannot use the native backend."""
    global _warned
    with _warn_lock:
        if _warned:
            return
        _warned = True
    warnings.warn(f"engine: the native CPU backend is unavailable ({cause}); using the "
                  "reference backend (eager PyTorch, slower) instead", RuntimeWarning, stacklevel=4)


# Built plans by id: the custom op below takes the id, so torch.compile traces one opaque call
# per MAR step (the C++ object itself cannot be an operator argument). This dict holds the only
# reference besides the owning backend's: an entry goes when that backend re-plans or is
# collected (weakref.finalize), so rebinding models never accumulates plans and packed weights.
_PLANS: dict[int, object] = {}
_next_plan_id = iter(range(1, 1 << 62))


@torch.library.custom_op("engine::native_head_loop", mutates_args=())
def native_head_loop(plan_id: int, z: torch.Tensor, x: torch.Tensor, noise: torch.Tensor,
                     cfg_scale: torch.Tensor | None, temperature: torch.Tensor) -> torch.Tensor:
    """cfg_scale (None without CFG) and temperature: float32 [n], one per result row."""
    out = _PLANS[plan_id].run(z, x, noise, cfg_scale, temperature)
    return out.clone() if out.data_ptr() == x.data_ptr() else out


@native_head_loop.register_fake
def _native_head_loop_fake(plan_id, z, x, noise, cfg_scale, temperature):
    return torch.empty_like(x)


def default_gemm(weight_dtype: torch.dtype) -> str:
    """The GEMM path measured fastest on the development CPU (see benchmarks/README.md).

    float32: MKL's packed sgemm. Against oneDNN's reordered product, in one process on the same
    row counts: the batched adaLN product 1.05-1.23x at 200-800 rows, whole head loops at 66-2050
    rows 1.1-1.29x; and no per-shape cost, where oneDNN builds a primitive for every new row count
    (sampling meets a new one at almost every MAR step; the first took 2 s). A build without MKL
    falls back to ATen. On other vendors' CPUs MKL runs its AVX2 code (on the AMD EPYC of the
    earlier tables oneDNN's float32 was 2-3x it), so there oneDNN. bfloat16: oneDNN (AMX,
    AVX512-BF16), which the plan widens where oneDNN has no bf16 kernels ("onednn_widened")."""
    if weight_dtype == torch.float32 and packed_linear.intel_cpu():
        return "mkl_packed"
    return "onednn"


class NativeBackend(HeadBackend):
    name = "native"
    packs_transformer = True

    def __init__(self, weight_dtype: torch.dtype = torch.float32, gemm: str = "auto",
                 small_gemm: str = "aten", mod_budget_bytes: int = DEFAULT_MOD_BUDGET,
                 pack_rows: int = 64, stream_rows: int = DEFAULT_STREAM_ROWS):
        if isinstance(weight_dtype, str):
            weight_dtype = {"float32": torch.float32, "fp32": torch.float32,
                            "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}.get(weight_dtype, weight_dtype)
        if weight_dtype not in WEIGHT_DTYPES:
            raise ConfigError(f"native backend: weight_dtype must be torch.float32 or torch.bfloat16, "
                              f"got {weight_dtype!r}")
        if gemm == "auto":
            gemm = default_gemm(weight_dtype)
        for label, value in (("gemm", gemm), ("small_gemm", small_gemm)):
            if value not in GEMM_MODES:
                raise ConfigError(f"native backend: {label} must be one of {sorted(GEMM_MODES)} or "
                                  f"'auto', got {value!r}")
        self.weight_dtype = weight_dtype
        self.gemm = gemm
        self.small_gemm = small_gemm
        self.mod_budget_bytes = int(mod_budget_bytes)
        self.pack_rows = int(pack_rows)
        if isinstance(stream_rows, bool) or not isinstance(stream_rows, int) or \
                not 0 <= stream_rows <= DEFAULT_STREAM_ROWS:
            raise ConfigError(f"native backend: stream_rows must be an int in [0, "
                              f"{DEFAULT_STREAM_ROWS}], got {stream_rows!r}")
        self.stream_rows = stream_rows
        self._plan = None
        self._plan_head = None
        self._plan_lock = threading.Lock()
        self._plan_id = 0
        self._release = None  # weakref.finalize dropping _PLANS[_plan_id]
        self._retimed: dict = {}  # (base plan id, steps) -> (retimed head, plan id): fast "disa"

    # Availability ----------------------------------------------------------------------------
    def _build_error(self) -> str | None:
        from ..native import build as native_build

        return native_build.build_error()

    def available(self, device) -> bool:
        device = torch.device(device)
        if device.type != "cpu":
            return False
        return self._build_error() is None

    def unavailable_reason(self, device) -> str:
        device = torch.device(device)
        if device.type != "cpu":
            return f"the native backend runs on the CPU only (model is on {device})"
        return self._build_error() or "available"

    # Plan --------------------------------------------------------------------------------------
    def _module(self):
        from ..native import build as native_build

        try:
            return native_build.load_extension()
        except native_build.NativeBuildError as exc:
            raise ConfigError(f"backend 'native' cannot run: {exc}") from None

    def _make_plan(self, head):
        if head.in_weight.device.type != "cpu":
            raise ConfigError(f"backend 'native' runs on the CPU only (head is on {head.in_weight.device})")
        module = self._module()
        tensors = [head.time_emb, head.table, head.cond_weight, head.cond_bias, head.in_weight,
                   head.in_bias, head.ln_weight, head.ln_bias, head.fc1_weight, head.fc1_bias,
                   head.fc2_weight, head.fc2_bias, head.ada_weight, head.ada_bias, head.out_weight,
                   head.out_bias]
        tensors = [t.detach().float().contiguous() for t in tensors]
        clip = None if head.clip_range is None else [float(head.clip_range[0]), float(head.clip_range[1])]
        with torch.no_grad():
            return module.HeadPlan(tensors, clip, self.weight_dtype == torch.bfloat16,
                                   GEMM_MODES[self.gemm], GEMM_MODES[self.small_gemm],
                                   self.mod_budget_bytes, self.pack_rows, self.stream_rows)

    def prepare(self, head) -> None:
        from ..core import cpu_memory

        cpu_memory.keep_large_allocations()  # large op outputs reuse the heap, not fresh mmaps
        self.plan_for(head)

    def plan_for(self, head):
        if head.base is not None:
            return self._retimed_plan(head)
        with self._plan_lock:
            if self._plan is None or self._plan_head is not head:
                # Free the superseded plan before building the new one (lower peak memory).
                if self._release is not None:
                    self._release()
                self._plan = self._plan_head = self._release = None
                plan = self._make_plan(head)
                self._plan_id = next(_next_plan_id)
                _PLANS[self._plan_id] = plan
                self._release = weakref.finalize(self, _PLANS.pop, self._plan_id, None)
                self._plan, self._plan_head = plan, head
            return self._plan

    def _retimed_plan(self, head):
        """The plan of a retimed head (fast "disa"): the base plan's packed weights, shared, with
        the head's own tables; one per step count, kept while the base plan lives."""
        base = self.plan_for(head.base)
        with self._plan_lock:
            key = (self._plan_id, head.num_steps)
            found = self._retimed.get(key)
            if found is None or found[0] is not head:
                plan = base.retimed(head.time_emb.detach().float().cpu(), head.table.detach().float().cpu())
                plan_id = next(_next_plan_id)
                _PLANS[plan_id] = plan
                weakref.finalize(self, _PLANS.pop, plan_id, None)
                found = self._retimed[key] = (head, plan_id)
            return _PLANS[found[1]]

    def _plan_id_of(self, head) -> int:
        if head.base is None:
            if self._plan_head is not head:  # bound in prepare(); traced calls skip the lock
                self.plan_for(head)
            return self._plan_id
        found = self._retimed.get((self._plan_id, head.num_steps)) if self._plan_head is head.base else None
        if found is None or found[0] is not head:
            self._retimed_plan(head)
            found = self._retimed[(self._plan_id, head.num_steps)]
        return found[1]

    def head_loop(self, head, z, x, noise, cfg_scale, temperature):
        plan_id = self._plan_id_of(head)
        n = x.shape[0]  # numbers become [n] tensors: the same float32 value for every row
        cfg = row_param(cfg_scale, "cfg_scale", n, z.device, optional=True, as_tensor=True)
        temp = row_param(temperature, "temperature", n, z.device, as_tensor=True)
        return native_head_loop(plan_id, z, x, noise, cfg, temp)

    def describe(self, head=None) -> str:
        if head is not None:
            return self.plan_for(head).describe()
        return self._plan.describe() if self._plan is not None else repr(self)

    def __repr__(self) -> str:
        return (f"<NativeBackend 'native' weights={WEIGHT_DTYPES[self.weight_dtype]} "
                f"gemm={self.gemm}>")
