"""One MAR step's diffusion loop (the head loop) at the MAR-B, -L and -H head shapes.

    python -m pytest benchmarks/bench_head.py --benchmark-enable --benchmark-group-by=group \
        --benchmark-json=benchmarks/results/head.json
    python benchmarks/report.py benchmarks/results/head.json

Random head weights (DiffusionHead + PackedHead.from_head), C = 16, CFG on (rows = [cond; uncond],
so 2, 8, 64, 512 rows are 1, 4, 32, 256 tokens), temperature 1. Backends: reference (the eager
published-equivalent loop), native (float32, the default), native-bf16 (bf16 weights, to measure
whether they pay) and triton where a GPU exists.

Diffusion steps: the published 100 for 2 and 8 rows; fewer for 64 and 512 rows so that one round
stays within seconds on a 2-core CPU (the group name says how many; the cost per step does not
depend on the count: the native loop's adaLN chunk covers at most a few steps at those row
counts). `report.py` scales every time to 100 steps. ENGINE_BENCH_STEPS=100 forces 100 everywhere;
ENGINE_BENCH_THREADS sets torch's thread count (default: torch's, 2 on the 2-core machine).
pytest.ini disables benchmarks by default: pass --benchmark-enable.
"""
from __future__ import annotations

import os

import pytest
import torch

import sys
from pathlib import Path

from engine.backends.reference import ReferenceBackend
from engine.ops.diffusion import make_tables
from engine.ops.head import DiffusionHead, PackedHead

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stamp import machine_stamp  # noqa: E402

TOKEN_DIM = 16
# name: (depth, width, cond dim = the decoder width of the preset)
SHAPES = {"MAR-B": (6, 1024, 768), "MAR-L": (8, 1280, 1024), "MAR-H": (12, 1536, 1280)}
ROWS = (2, 8, 64, 512)
STEPS = {2: 100, 8: 100, 64: 20, 512: 4}
BACKENDS = ("reference", "native", "native-bf16", "triton")
CFG_SCALE = 3.0


def steps_for(rows: int) -> int:
    forced = os.environ.get("ENGINE_BENCH_STEPS")
    return int(forced) if forced else STEPS[rows]


_heads: dict = {}
if os.environ.get("ENGINE_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["ENGINE_BENCH_THREADS"]))


def packed_head(shape: str, steps: int, device: str = "cpu") -> PackedHead:
    key = (shape, steps, device)
    if key not in _heads:
        depth, width, cond = SHAPES[shape]
        torch.manual_seed(0)
        net = DiffusionHead(TOKEN_DIM, cond, width, depth).eval().to(device)
        _heads.clear()  # keep one head (the -H weights are large) at a time
        _heads[key] = PackedHead.from_head(net, make_tables(str(steps)))
    return _heads[key]


def make_backend(name: str, device: str):
    if name == "reference":
        return ReferenceBackend()
    if name in ("native", "native-bf16"):
        from engine.backends.native import NativeBackend

        backend = NativeBackend(weight_dtype=torch.bfloat16 if name == "native-bf16" else torch.float32)
        if not backend.available(device):
            pytest.skip(f"native backend unavailable: {backend.unavailable_reason(device)}")
        return backend
    if name == "triton":
        if not torch.cuda.is_available():
            pytest.skip("triton benchmarks need a GPU")
        try:
            from engine.backends.triton import TritonBackend
        except ImportError as exc:
            pytest.skip(f"triton backend missing: {exc}")
        backend = TritonBackend()
        if not backend.available(torch.device(device)):
            pytest.skip("triton backend unavailable")
        return backend
    raise ValueError(name)


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_head_loop(benchmark, shape, rows, backend_name):
    device = "cuda" if backend_name == "triton" else "cpu"
    steps = steps_for(rows)
    backend = make_backend(backend_name, device)
    head = packed_head(shape, steps, device)
    backend.prepare(head)
    n = rows // 2
    gen = torch.Generator().manual_seed(rows)
    z = torch.randn(rows, SHAPES[shape][2], generator=gen).to(device)
    x = torch.randn(n, TOKEN_DIM, generator=gen).to(device)
    noise = torch.randn(steps, rows, TOKEN_DIM, generator=gen).to(device)

    def run():
        out = backend.head_loop(head, z, x, noise, CFG_SCALE, 1.0)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    benchmark.group = f"head {shape} rows={rows} steps={steps}"
    depth, width, cond = SHAPES[shape]
    benchmark.extra_info.update(shape=shape, rows=rows, steps=steps, backend=backend_name,
                                depth=depth, width=width, **machine_stamp())
    # One warm-up (builds oneDNN primitives), then a few timed rounds; a round is a whole loop.
    rounds = 3 if steps * rows * width <= 100 * 8 * 1536 else 2
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)
