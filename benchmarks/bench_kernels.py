"""GPU timings of the Triton head kernels and of whole head loops (pytest-benchmark).

    pytest benchmarks/bench_kernels.py --benchmark-group-by=param:shape

Shapes are the released heads (MAR-B 6x1024, MAR-L 8x1280, MAR-H 12x1536; token dim 16) at
batch 1 with CFG (4 tokens per MAR step -> 8 rows) and batch 32 with CFG. Skipped without CUDA:
in Triton's interpreter the timings would mean nothing.
"""
import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available():
    pytest.skip("benchmarks need a CUDA GPU (and TRITON_INTERPRET unset)", allow_module_level=True)

from engine.backends.reference import ReferenceBackend  # noqa: E402
from engine.backends.triton import TritonBackend  # noqa: E402
from engine.ops.diffusion import make_tables  # noqa: E402
from engine.kernels.head_block import final_ddpm, resblock  # noqa: E402
from engine.kernels.linear_epilogue import PRO_SILU, linear_epilogue  # noqa: E402
from engine.ops.head import DiffusionHead, PackedHead  # noqa: E402

HEADS = {"B": (6, 1024), "L": (8, 1280), "H": (12, 1536)}
C, D = 16, 1024
ROWS = {"bsz1": 8, "bsz32": 256}   # rows per MAR step with CFG (2n)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def timed(benchmark, fn, *args):
    def run():
        fn(*args)
        torch.cuda.synchronize()
    run()   # compile / warm up outside the timing
    benchmark.pedantic(run, rounds=50, iterations=5, warmup_rounds=3)


def weights(width, depth, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device="cuda") * scale)

    w = width
    return dict(ada=rand((3 * depth + 2) * w, w, scale=w ** -0.5).to(dtype), ada_b=rand((3 * depth + 2) * w),
                c=rand(1, w).expand(256, w).contiguous(), t=rand(w),
                fc1=rand(w, w, scale=w ** -0.5).to(dtype), fc2=rand(w, w, scale=w ** -0.5).to(dtype),
                b=rand(w), lnw=1 + 0.1 * rand(w), out=rand(2 * C, w, scale=w ** -0.5).to(dtype),
                out_b=rand(2 * C))


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("rows", list(ROWS))
@pytest.mark.parametrize("shape", list(HEADS))
def test_adaln_gemm(benchmark, shape, rows, dtype):
    depth, w = HEADS[shape]
    p = weights(w, depth, DTYPES[dtype])
    timed(benchmark, linear_epilogue, p["c"][:ROWS[rows]], p["ada"], p["ada_b"], p["t"], PRO_SILU)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("rows", list(ROWS))
@pytest.mark.parametrize("shape", list(HEADS))
def test_resblock(benchmark, shape, rows, dtype):
    depth, w = HEADS[shape]
    p = weights(w, depth, DTYPES[dtype])
    M = ROWS[rows]
    h = torch.randn(M, w, device="cuda")
    mods = torch.randn(M, 3 * w, device="cuda")
    timed(benchmark, resblock, h, mods, p["lnw"], p["b"], p["fc1"], p["b"], p["fc2"], p["b"])


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("rows", list(ROWS))
@pytest.mark.parametrize("shape", list(HEADS))
def test_final_ddpm(benchmark, shape, rows, dtype):
    depth, w = HEADS[shape]
    p = weights(w, depth, DTYPES[dtype])
    M = ROWS[rows]
    h = torch.randn(M, w, device="cuda")
    mods = torch.randn(M, 2 * w, device="cuda")
    x = torch.randn(M // 2, C, device="cuda")
    noise = torch.randn(M, C, device="cuda")
    coeffs = make_tables("100").as_tensor("cuda")[50]
    n = M // 2   # per-row settings: one cfg scale and temperature per result row
    cfg, temperature = torch.full((n,), 3.0, device="cuda"), torch.ones(n, device="cuda")
    timed(benchmark, final_ddpm, h, mods, p["out"], p["out_b"], x, noise, coeffs, cfg, temperature,
          None, None)


def packed_head(shape, steps="100"):
    depth, w = HEADS[shape]
    torch.manual_seed(0)
    net = DiffusionHead(C, D, w, depth).cuda().eval()
    return PackedHead.from_head(net, make_tables(steps))


@pytest.mark.parametrize("backend", ["triton-fp32", "triton-bf16", "reference"])
@pytest.mark.parametrize("rows", list(ROWS))
@pytest.mark.parametrize("shape", list(HEADS))
def test_head_loop(benchmark, shape, rows, backend):
    """One MAR step's whole diffusion loop (100 steps) with CFG."""
    head = packed_head(shape)
    impl = {"triton-fp32": lambda: TritonBackend(), "triton-bf16": lambda: TritonBackend(torch.bfloat16),
            "reference": ReferenceBackend}[backend]()
    impl.prepare(head)
    M = ROWS[rows]
    z = torch.randn(M, D, device="cuda")
    x = torch.randn(M // 2, C, device="cuda")
    noise = torch.randn(head.num_steps, M, C, device="cuda")

    def run():
        impl.head_loop(head, z, x, noise, 3.0, 1.0)
        torch.cuda.synchronize()
    run()
    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
