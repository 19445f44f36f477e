"""End-to-end `sample_tokens` with a MAR-B-shaped model on random weights, CFG on.

    python -m pytest benchmarks/bench_sample.py --benchmark-enable --benchmark-group-by=group \
        --benchmark-json=benchmarks/results/sample.json

MAR-B: 12+12 transformer blocks of width 768, head 6 x 1024, 256 tokens of 16 channels, class
labels, cfg 3.0 (linear schedule), temperature 1. One round per backend (a round is minutes on a
2-core CPU). The cases (the group name carries them):
  * batch 1, the published num_iter 64 and 100 diffusion steps;
  * batch 16, reduced to num_iter 4 and 10 diffusion steps (the published settings would take
    about an hour per round on 2 cores); set ENGINE_BENCH_SAMPLE_FULL=1 for num_iter 64 / 100 steps.
After the native rounds the tokens are compared with the reference round's (relative error
recorded as extra_info "rel_err_vs_reference"; the test fails above 1e-4 for float32 and above
0.1 for "native-bf16", precision="bf16"). extra_info "head_loop_s"
is the part of the round spent in the head loops (the rest is the transformer and bookkeeping).
ENGINE_BENCH_THREADS sets torch's thread count (default: torch's, 2 on the 2-core machine).
"""
from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.core.config import PRESETS, MARConfig
from engine.families.mar import MARModel
from engine.models.mar import MAR

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stamp import machine_stamp  # noqa: E402

FULL = os.environ.get("ENGINE_BENCH_SAMPLE_FULL", "") not in ("", "0")
# (batch, num_iter, diffusion steps)
CASES = [(1, 64, "100"), (16, 64, "100") if FULL else (16, 4, "10")]
# "native-bf16": the native backend with precision="bf16" (transformer under bf16 autocast, bf16
# head weights): not the published tokens, so it is checked against a looser bound.
BACKENDS = ("reference", "native", "native-bf16")
BF16_MAX_REL_ERR = 0.1
CFG = 3.0

_tokens: dict = {}
if os.environ.get("ENGINE_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["ENGINE_BENCH_THREADS"]))


def mar_b(steps: str) -> MARModel:
    config = dict(PRESETS["mar_base"])
    config.update(num_sampling_steps=steps)
    torch.manual_seed(0)
    mar = MAR(MARConfig(**config))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random weights with sensible scales (no zero-initialised layers)
        for name, p in mar.named_parameters():
            if p.dim() == 1 and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(max(p.shape[-1], 1)))
    return MARModel(mar, backend="reference")


@pytest.fixture(scope="module")
def models():
    return {}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bsz,num_iter,steps", CASES, ids=lambda v: str(v))
def test_sample_tokens(benchmark, models, bsz, num_iter, steps, backend):
    if steps not in models:
        models.clear()
        models[steps] = mar_b(steps)
    model = models[steps]
    precision = "bf16" if backend.endswith("-bf16") else "fp32"
    if backend != "reference":
        from engine.backends.native import NativeBackend

        if not NativeBackend().available("cpu"):
            pytest.skip(f"native backend unavailable: {NativeBackend().unavailable_reason('cpu')}")
    model = MARModel(model.mar, backend=backend.removesuffix("-bf16"), precision=precision)
    labels = [(7 * i + 3) % 1000 for i in range(bsz)]
    head_time = [0.0]
    head_loop = model.backend.head_loop

    def timed_head_loop(*args, **kwargs):  # to split the time: head loops vs the rest
        start = time.perf_counter()
        out = head_loop(*args, **kwargs)
        head_time[0] += time.perf_counter() - start
        return out

    model.backend.head_loop = timed_head_loop

    def run():
        head_time[0] = 0.0
        torch.manual_seed(0)
        np.random.seed(0)
        return model.sample_tokens(bsz, num_iter=num_iter, cfg=CFG, labels=labels)

    benchmark.group = f"sample_tokens MAR-B bsz={bsz} cfg={CFG} num_iter={num_iter} steps={steps}"
    benchmark.extra_info.update(bsz=bsz, num_iter=num_iter, steps=int(steps), backend=backend,
                                **machine_stamp())
    out = benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    benchmark.extra_info["head_loop_s"] = head_time[0]
    key = (bsz, num_iter, steps)
    if backend == "reference":
        _tokens[key] = out
    elif key in _tokens:
        ref = _tokens[key].double()
        err = float((out.double() - ref).norm() / ref.norm())
        benchmark.extra_info["rel_err_vs_reference"] = err
        assert err <= (1e-4 if precision == "fp32" else BF16_MAX_REL_ERR), err
