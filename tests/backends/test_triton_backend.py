"""TritonBackend: head loops match the reference backend, golden tokens end to end, at most
depth + 3 launches per diffusion step, and a head loop traces under torch.compile."""
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

import engine
from engine.backends.reference import ReferenceBackend
from engine.backends.triton import TritonBackend
from engine.ops.diffusion import make_tables
from engine.ops.head import DiffusionHead, PackedHead

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def model(golden_dir):
    return engine.load(golden_dir / "checkpoint-last.pth", backend="reference", device=DEVICE)


def short_head(model, steps="10", clip=None):
    """The golden head with fewer diffusion steps: the interpreter is slow."""
    return PackedHead.from_head(model.head.net, make_tables(steps), clip)


def inputs(head, n, cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = 2 * n if cfg is not None else n
    z = torch.randn(rows, head.cond_weight.shape[1], generator=g)
    x = torch.randn(n, head.token_dim, generator=g)
    noise = torch.randn(head.num_steps, rows, head.token_dim, generator=g)
    return z.to(DEVICE), x.to(DEVICE), noise.to(DEVICE)


def compare(head, n, cfg, temperature=0.9, backend=None, tol=1e-4):
    z, x, noise = inputs(head, n, cfg)
    got = (backend or TritonBackend()).head_loop(head, z, x, noise, cfg, temperature)
    want = ReferenceBackend().head_loop(head, z, x, noise, cfg, temperature)
    assert got.shape == want.shape == (n, head.token_dim)
    assert rel_err(got, want) <= tol, rel_err(got, want)


@pytest.mark.parametrize("n,cfg", [(3, None), (4, 3.0), (1, 1.5)])
def test_head_loop_matches_reference(model, n, cfg):
    compare(short_head(model), n, cfg)


def test_head_loop_with_clip(model):
    head = short_head(model, clip=(-1.0, 1.0))
    compare(head, 3, 2.0)
    compare(head, 2, None)


def test_head_loop_other_shapes():
    """Odd token dim, width 80, depth 3 and depth 0, a respacing with sections."""
    torch.manual_seed(0)
    for depth in (3, 0):
        net = DiffusionHead(token_dim=3, cond_dim=24, width=80, depth=depth).to(DEVICE)
        head = PackedHead.from_head(net, make_tables("4,3"), None)
        compare(head, 5, None, temperature=1.1)
        compare(head, 2, 2.5)


@pytest.mark.parametrize("cfg", [None, "rows"])
def test_per_row_cfg_and_temperature(model, cfg):
    """One call with a CFG scale and a temperature per row: row r equals a call with row r's
    numbers, and the reference backend's per-row result; equal values equal the number."""
    head = short_head(model, steps="4")
    n = 3
    scales = torch.tensor([1.0, 2.5, 4.0], device=DEVICE) if cfg else None
    temps = torch.tensor([0.9, 0.3, 1.2], device=DEVICE)
    z, x, noise = inputs(head, n, scales)
    backend = TritonBackend()
    got = backend.head_loop(head, z, x, noise, scales, temps)
    assert rel_err(got, ReferenceBackend().head_loop(head, z, x, noise, scales, temps)) <= 1e-4
    for r in range(n):
        one = backend.head_loop(head, z, x, noise, None if cfg is None else float(scales[r]),
                                float(temps[r]))
        assert rel_err(got[r], one[r]) <= 1e-6, r
    number = None if cfg is None else 2.0
    same = backend.head_loop(head, z, x, noise, None if cfg is None else torch.full((n,), 2.0),
                             torch.full((n,), 0.7))
    assert torch.equal(same, backend.head_loop(head, z, x, noise, number, 0.7))
    with pytest.raises(ValueError, match=r"temperature .*shape \[3\]"):
        backend.head_loop(head, z, x, noise, number, torch.ones(n + 1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_weights(model, dtype):
    head = short_head(model, steps="5")
    compare(head, 3, 2.0, backend=TritonBackend(weight_dtype=dtype), tol=2e-2)


class CountOps(TorchDispatchMode):
    """Counts calls of the engine's custom ops (each is exactly one Triton launch)."""

    def __init__(self):
        super().__init__()
        self.calls = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "engine":
            name = func.__name__.split(".")[0]
            self.calls[name] = self.calls.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("cfg", [None, 2.0])
def test_launches_per_diffusion_step(model, cfg):
    from engine.kernels.utils import LAUNCHES

    head = short_head(model, steps="6")
    backend = TritonBackend()
    backend.prepare(head)
    z, x, noise = inputs(head, 3, cfg)
    before = sum(LAUNCHES.values())
    with CountOps() as counter:
        backend.head_loop(head, z, x, noise, cfg, 1.0)
    launches = sum(LAUNCHES.values()) - before
    ops = sum(counter.calls.values())
    assert launches == ops   # nothing launches outside the custom ops
    T = head.num_steps
    per_step = (ops - 1) / T  # one cond_embed GEMM per head loop (per MAR step)
    assert per_step <= head.depth + 3
    assert counter.calls == {"linear_epilogue": 1 + 2 * T, "resblock": head.depth * T,
                             "final_ddpm": T}


def test_head_loop_traces_with_torch_compile(model):
    head = short_head(model, steps="3")
    backend = TritonBackend()
    backend.prepare(head)
    z, x, noise = inputs(head, 2, 3.0)
    eager = backend.head_loop(head, z, x, noise, 3.0, 1.0)
    torch._dynamo.reset()
    compiled = torch.compile(backend.head_loop, fullgraph=True, backend="eager")
    assert torch.equal(compiled(head, z, x, noise, 3.0, 1.0), eager)


def test_availability(monkeypatch):
    backend = TritonBackend()
    assert backend.name == "triton"
    assert backend.available(torch.device(DEVICE))
    assert not backend.available(torch.device("meta"))
    assert "CUDA" in backend.unavailable_reason(torch.device("meta"))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)   # read at call time, never at import
    assert not backend.available(torch.device("cpu"))
    assert "TRITON_INTERPRET=1" in backend.unavailable_reason(torch.device("cpu"))
    with pytest.raises(engine.ConfigError):
        TritonBackend(weight_dtype=torch.int8)


@pytest.mark.parametrize("case", ["run3"])
def test_golden_tokens(golden_dir, case):
    """model.set_backend("triton") reproduces the published sampler's tokens (run3: 4 MAR steps,
    no CFG; the interpreter is slow. The CFG loop is compared with the reference backend above,
    and tests/families/mar/test_published_outputs.py runs published CFG cases through triton)."""
    cases = json.loads((golden_dir / "golden.json").read_text())["cases"]
    params = {c["name"]: c["params"] for c in cases}[case]
    want = load_file(str(golden_dir / "golden.safetensors"))[f"{case}.tokens"]
    model = engine.load(golden_dir / "checkpoint-last.pth", backend="reference", device=DEVICE)
    model.set_backend("triton")
    assert model.backend_name == "triton"
    torch.manual_seed(params["seed"])
    np.random.seed(params["seed"])
    got = model.sample_tokens(params["bsz"], params["num_iter"], params["cfg"], params["cfg_schedule"],
                              params["labels"], params["temperature"])
    assert rel_err(got.cpu(), want) <= 1e-4
