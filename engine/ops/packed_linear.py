"""Transformer products on weights packed once for the CPU (the native backend's transformer).

float32 on an Intel CPU: MKL's packed sgemm (cblas_sgemm_compute, through the native extension): on the
development Xeon, 2 threads, interleaved runs at MAR-B's shapes, 1.06-1.15x oneDNN's reordered
product at 128-640 rows (equal at 24) and up to ~2x MKL's plain sgemm at few rows; the same sums
as F.linear (bias first, then C += A W^T, as at::addmm does: MAR-B tokens bitwise equal to the
reference backend's in benchmarks/bench_sample.py). Without the
extension (or without MKL) float32 falls back to oneDNN. On other vendors' CPUs MKL runs its
AVX2 code: on a 2-vCPU AMD EPYC (Zen 1) oneDNN's product was 1.07-1.3x MKL's at 128-640 rows of
MAR-B's shapes and 2.9x at 8 rows, so there float32 packs for oneDNN. bfloat16 (precision="bf16",
under CPU autocast): oneDNN on weights reordered once, autocast's own product. A CPU whose oneDNN
has no bf16 kernels (AVX2 only: no avx512bw/vl/dq nor avx_ne_convert) computes autocast's bf16
F.linear at a fifth of its float32 speed (2-vCPU AMD EPYC, AVX2: 6.8 against 35 GFLOP/s at 640
rows), so there the bf16 product is "widened": oneDNN's float32 product of the bf16-rounded
operands (their products are exact in float32), rounded once to bf16 — the sums a bf16 kernel
forms, at the float32 rate.
"""
from __future__ import annotations

import functools
import weakref

import torch


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def onednn_bf16_available() -> bool:
    """Whether oneDNN has bf16 kernels on this CPU (its reorder refuses bf16 weights otherwise)."""
    supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return onednn_available() and supported is not None and bool(supported())


def intel_cpu() -> bool:
    """Whether this is an Intel CPU (MKL's own kernels). Read when asked, never at import."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return "GenuineIntel" in line
    except OSError:
        pass
    import platform

    return "intel" in platform.processor().lower()


@functools.lru_cache(maxsize=1)
def _native():
    """The native extension when it is built (or builds) and has MKL's packed GEMM, else None."""
    from ..native import build as native_build

    ext = native_build.extension_or_none()
    return ext if hasattr(ext, "MklPackedLinear") and ext.has_mkl_packed() else None


def mkl_available() -> bool:
    return _native() is not None


# Packed layers by id: the custom op takes the id (a C++ object cannot be an operator argument,
# and MKL's packed buffer cannot be a tensor: it is only valid at the address it was written).
_LAYERS: dict[int, object] = {}
_next_id = iter(range(1, 1 << 62))


class MklPack:
    """One weight (and bias) packed for MKL; shared, never copied (deepcopy returns it)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.layer = _native().MklPackedLinear(weight.detach().float().contiguous(),
                                               None if bias is None else bias.detach().float())
        self.n = self.layer.n
        self.id = next(_next_id)
        _LAYERS[self.id] = self.layer
        weakref.finalize(self, _LAYERS.pop, self.id, None)

    def __deepcopy__(self, memo):
        return self


def float32_kind() -> str | None:
    """The float32 packing this CPU runs fastest: "mkl" (Intel, with the extension), "onednn", or
    None when this torch build has neither (then nothing is packed)."""
    if mkl_available() and (intel_cpu() or not onednn_available()):
        return "mkl"
    return "onednn" if onednn_available() else None


def pack(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
         kind: str | None = None) -> tuple | None:
    """(kind, packed weight, bias) for W [N, K]: "mkl" (float32 with the extension; the bias
    lives in the pack) or "onednn" (weight reordered once, bias in `dtype`); `kind` None picks
    this CPU's (float32_kind; bf16: oneDNN). None when this CPU has no packed path for `dtype`:
    the caller keeps F.linear."""
    if kind is None:
        kind = float32_kind() if dtype == torch.float32 else (
            "onednn" if onednn_bf16_available() else "widened" if onednn_available() else None)
        if kind is None:
            return None
    if kind == "mkl":
        if dtype != torch.float32 or not mkl_available():
            raise RuntimeError("packed linear: MKL's packed path is float32 with the native extension")
        return "mkl", MklPack(weight, bias), None
    if kind not in ("onednn", "widened") or not onednn_available():
        raise RuntimeError(f"packed linear: no {kind!r} path in this torch build")
    if kind == "widened":
        if dtype != torch.bfloat16:
            raise RuntimeError("packed linear: the widened path is for bfloat16")
        # float32 holding the bf16-rounded values: oneDNN's float32 product of the bf16 operands.
        as_bf16_in_f32 = lambda t: t.detach().to(dtype).float().contiguous()  # noqa: E731
        reordered = torch.ops.mkldnn._reorder_linear_weight(as_bf16_in_f32(weight), None)
        return "widened", reordered, None if bias is None else as_bf16_in_f32(bias)
    reordered = torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(dtype).contiguous(), None)
    return "onednn", reordered, None if bias is None else bias.detach().to(dtype).contiguous()


@torch.library.custom_op("engine::mkl_packed_linear", mutates_args=())
def mkl_packed_linear(x: torch.Tensor, pack_id: int, n: int) -> torch.Tensor:
    """x [..., K] float32 @ W^T + bias -> [..., n], W and bias held by MklPack `pack_id`."""
    return _LAYERS[pack_id].run(x)


@mkl_packed_linear.register_fake
def _mkl_packed_linear_fake(x, pack_id, n):
    return x.new_empty((*x.shape[:-1], n))


def run(kind: str, x: torch.Tensor, packed, bias: torch.Tensor | None, gelu: bool = False) -> torch.Tensor:
    """The packed product; with `gelu`, exact (erf) GELU of it (oneDNN: a post-op on its float32
    sums, saving a pass over the output). "widened" takes and returns bf16."""
    if kind == "mkl":
        h = mkl_packed_linear(x, packed.id, packed.n)
        return torch.ops.aten.gelu_(h) if gelu else h
    if kind == "widened":   # bf16 in (rounded if it was not), float32 sums, one bf16 rounding out
        x = x.to(torch.bfloat16).float()
        post = ("gelu", [], "none") if gelu else ("none", [], "")
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, *post).to(torch.bfloat16)
    if gelu:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "gelu", [], "none")
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
