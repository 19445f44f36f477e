"""Head backends by name: reference (eager PyTorch), native (C++ CPU), triton (GPU kernels)."""
from __future__ import annotations

import torch

from ..core.errors import ConfigError
from .base import HeadBackend

BACKENDS = ("reference", "native", "triton")


def _make(name: str, weight_dtype: torch.dtype = torch.float32) -> HeadBackend:
    """A backend by name; `weight_dtype` (the model's bf16/fp16 precision) sets the type the
    native loop and the Triton kernels read weights in. The reference stays float32."""
    if name == "reference":
        from .reference import ReferenceBackend
        return ReferenceBackend()
    if name == "native":
        from .native import NativeBackend
        # bf16 or float32 (fp16 is a CUDA precision, where this backend does not run anyway)
        return NativeBackend(weight_dtype=torch.bfloat16 if weight_dtype == torch.bfloat16 else torch.float32)
    if name == "triton":
        from .triton import TritonBackend
        return TritonBackend(weight_dtype=weight_dtype)
    raise ConfigError(f"unknown backend {name!r}; expected one of {BACKENDS + ('auto',)}")


def available_backends(device, include_interpreted: bool = False) -> list[str]:
    """Backends that can run on `device`, fastest first (checked at call time, not import).

    Triton counts on CUDA only: on CPU it runs in Triton's interpreter, a test tool far slower
    than eager PyTorch, used only when asked for by name (or with include_interpreted)."""
    device = torch.device(device)
    names = []
    candidates = ("triton", "native") if device.type == "cuda" or include_interpreted else ("native",)
    for name in candidates:
        try:
            if _make(name).available(device):
                names.append(name)
        except Exception:  # a backend that cannot even be constructed is unavailable
            pass
    return names + ["reference"]


def get_backend(name: str | HeadBackend, device, weight_dtype: torch.dtype = torch.float32) -> HeadBackend:
    if isinstance(name, HeadBackend):
        return name
    if name == "auto":
        best = available_backends(device)[0]
        if torch.device(device).type == "cpu" and best != "native":
            from .native import NativeBackend, fallback_warning
            fallback_warning(NativeBackend().unavailable_reason(torch.device(device)))
        return _make(best, weight_dtype)
    backend = _make(name, weight_dtype)
    if hasattr(backend, "available") and not backend.available(torch.device(device)):
        reason = getattr(backend, "unavailable_reason", lambda d: "not available")(torch.device(device))
        raise ConfigError(f"backend {name!r} cannot run on {device}: {reason}")
    return backend
