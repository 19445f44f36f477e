"""Head backends by name: reference (eager PyTorch), native (C++ CPU), triton (GPU kernels)."""
from __future__ import annotations

import warnings

import torch

from ..errors import ConfigError
from .base import HeadBackend

BACKENDS = ("reference", "native", "triton")


def _make(name: str) -> HeadBackend:
    if name == "reference":
        from .reference import ReferenceBackend
        return ReferenceBackend()
    if name == "native":
        from .native import NativeBackend
        return NativeBackend()
    if name == "triton":
        from .triton import TritonBackend
        return TritonBackend()
    raise ConfigError(f"unknown backend {name!r}; expected one of {BACKENDS + ('auto',)}")


def available_backends(device) -> list[str]:
    """Backends that can run on `device`, fastest first (checked at call time, not import)."""
    device = torch.device(device)
    names = []
    for name in ("triton", "native"):
        try:
            if _make(name).available(device):
                names.append(name)
        except Exception:  # a backend that cannot even be constructed is unavailable
            pass
    return names + ["reference"]


def get_backend(name: str | HeadBackend, device) -> HeadBackend:
    if isinstance(name, HeadBackend):
        return name
    if name == "auto":
        best = available_backends(device)[0]
        return _make(best)
    backend = _make(name)
    if hasattr(backend, "available") and not backend.available(torch.device(device)):
        reason = getattr(backend, "unavailable_reason", lambda d: "not available")(torch.device(device))
        raise ConfigError(f"backend {name!r} cannot run on {device}: {reason}")
    return backend


def warn_fallback(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)
