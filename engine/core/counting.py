"""Counting device operations per call: every non-view ATen op dispatched, each custom op
(a fused kernel launcher) counted once with nothing inside it. Works for any backend and for
any callable, e.g. the published model's own `sample_tokens`."""
from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Ops that touch no device memory: metadata, views, and allocations' bookkeeping.
_FREE = {"aten.detach.default", "aten.alias.default", "aten.lift_fresh.default", "prim.device.default",
         "aten.is_same_size.default", "aten._local_scalar_dense.default"}


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()
        self.host_syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name == "aten._local_scalar_dense.default" or name.startswith("aten.nonzero"):
            self.host_syncs += 1  # .item(), bool(tensor), nonzero's output size: a device->host wait
        if not (getattr(func, "is_view", False) or name in _FREE):
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def count_ops(fn, *args, **kwargs) -> tuple[object, OpCounter]:
    """Run `fn(*args, **kwargs)` and return (its result, the counter)."""
    counter = OpCounter()
    with counter:
        result = fn(*args, **kwargs)
    return result, counter
