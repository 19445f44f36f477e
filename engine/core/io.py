"""Safe reads of checkpoint files: torch files loaded with weights_only (never unpickling arbitrary
objects; a run's `argparse.Namespace` allowed), and the finiteness check every loaded tensor
passes. Family-agnostic: the families' checks live in engine/families/checkpoints.py."""
from __future__ import annotations

import argparse
import threading
from pathlib import Path

import torch

from .errors import CheckpointError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"

_SAFE_GLOBALS_LOCK = threading.Lock()


def _allow_namespace() -> None:
    """Allow `argparse.Namespace` in every weights-only load of this process. Registered, never
    withdrawn: torch's `safe_globals` context manager is process-global, so one thread leaving it
    would withdraw the allowance from another thread's load in progress. Re-added (cheaply) on
    every load in case other code's `safe_globals([argparse.Namespace])` block removed it."""
    if argparse.Namespace not in torch.serialization.get_safe_globals():
        with _SAFE_GLOBALS_LOCK:
            if argparse.Namespace not in torch.serialization.get_safe_globals():
                torch.serialization.add_safe_globals([argparse.Namespace])


def torch_load_weights(path) -> object:
    """`torch.load(path, weights_only=True)` onto the CPU with `argparse.Namespace` allowed;
    thread-safe. Errors are torch's own (callers word them)."""
    for attempt in range(3):
        _allow_namespace()
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            # Only if someone withdrew the allowance between our registration and the load.
            if attempt == 2 or "argparse.Namespace" not in str(err):
                raise


def read_torch_file(path: Path) -> object:
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory without {CONFIG_FILE}; expected a .pth file "
                              "or an engine model directory")
    try:
        return torch_load_weights(path)
    except Exception as err:  # torch raises many types here (zip, pickle, EOF, runtime)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            raise CheckpointError(f"{path} holds Python objects other than tensors and the run's "
                                  f"args; refusing to unpickle them ({first})") from None
        raise CheckpointError(f"{path} is not a readable torch checkpoint (truncated or "
                              f"corrupt?): {first}") from None


WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_dtypes(state: dict, source: str, expected: dict | None = None) -> None:
    """CheckpointError naming the first tensor whose dtype cannot hold its weights: a tensor the
    module keeps in floating point (every one when `expected`, key -> the module's own dtype, is
    None) must be float16, bfloat16, float32 or float64 (cast on load); integer, boolean, complex
    and float8 tensors (a quantised export) are refused rather than cast into wrong weights, and
    sparse or meta tensors too. A tensor the module keeps as integers (CTF's cluster map) must be
    an integer tensor."""
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        if value.is_meta or value.layout != torch.strided:   # nothing below can read them
            kind = "a meta tensor (no values)" if value.is_meta else \
                f"a {str(value.layout).removeprefix('torch.')} tensor"
            raise CheckpointError(f"{source}: tensor {key!r} is {kind}; weights must be dense tensors "
                                  "holding their values")
        want = expected.get(key, torch.float32) if expected else torch.float32
        if want.is_floating_point:
            if value.dtype not in WEIGHT_DTYPES:
                raise CheckpointError(
                    f"{source}: tensor {key!r} has dtype {str(value.dtype).removeprefix('torch.')}; "
                    "weights must be float16, bfloat16, float32 or float64 (integer, boolean, "
                    "complex and float8 tensors, e.g. a quantised export, are refused)")
        elif value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise CheckpointError(
                f"{source}: tensor {key!r} has dtype {str(value.dtype).removeprefix('torch.')}; "
                f"it must be an integer tensor ({str(want).removeprefix('torch.')})")


def _count_nonfinite(t: torch.Tensor) -> int:
    """0 when every value of the floating tensor `t` is finite, else how many are not
    (one fused min/max pass in the common, all-finite case)."""
    if t.numel() == 0 or t.is_meta:
        return 0
    try:
        low, high = torch.aminmax(t.detach())
        if bool(torch.isfinite(low) & torch.isfinite(high)):
            return 0
    except (RuntimeError, NotImplementedError):  # dtypes without aminmax (float8...)
        pass
    return int((~torch.isfinite(t.detach())).sum())


def check_finite(state: dict, source: str) -> None:
    """CheckpointError naming the first floating tensor of `state` holding NaN or Inf."""
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex()):
            bad = _count_nonfinite(value)
            if bad:
                others = [k for k, v in state.items() if k != key and isinstance(v, torch.Tensor)
                          and (v.is_floating_point() or v.is_complex()) and _count_nonfinite(v)]
                more = f"; {len(others)} other tensors too, e.g. {others[:3]}" if others else ""
                raise CheckpointError(
                    f"{source}: tensor {key!r} holds {bad} non-finite values (NaN or Inf) of "
                    f"{value.numel()}{more}; refusing weights that cannot sample")


