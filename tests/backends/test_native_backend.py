"""The native CPU backend (csrc/head_loop.cpp): same tokens as the reference backend and the
published sampler, for the golden model and random heads of other shapes, and a clear fallback
when the extension cannot be built.

All tests share one build of the extension (session fixture); it is cached under the user cache
directory, so only the very first run on a machine compiles (about a minute)."""
import gc
import os
import warnings

import numpy as np
import pytest
import torch

import engine
from engine.native import build as native_build
from engine.backends import native as native_mod
from engine.backends.native import NativeBackend
from engine.backends.reference import ReferenceBackend
from engine.ops.diffusion import make_tables
from engine.core.errors import ConfigError
from engine.ops.head import DiffusionHead, PackedHead
from helpers import CHECKPOINT, golden_cases, golden_tensors, rel_err, run_golden_head_case

TOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")  # test_parallel_rows_match_serial covers two threads


@pytest.fixture(scope="module")
def golden_model(native_ext):
    return engine.load(CHECKPOINT, backend="reference")


@pytest.fixture(scope="module")
def golden_native(native_ext):
    return engine.load(CHECKPOINT, backend="native")


@pytest.fixture(scope="module")
def golden_raw_native(native_ext):
    return engine.load(CHECKPOINT, ema=False, backend="native")


def _inputs(head, n, cfg, seed=0, cond_dim=None):
    gen = torch.Generator().manual_seed(seed)
    rows = 2 * n if cfg is not None else n
    cond_dim = cond_dim or head.cond_weight.shape[1]
    z = torch.randn(rows, cond_dim, generator=gen)
    x = torch.randn(n, head.token_dim, generator=gen)
    noise = torch.randn(head.num_steps, rows, head.token_dim, generator=gen)
    return z, x, noise


def _both(head, n, cfg, temperature=1.0, seed=0, backend=None):
    z, x, noise = _inputs(head, n, cfg, seed)
    want = ReferenceBackend().head_loop(head, z, x, noise, cfg, temperature)
    backend = backend or NativeBackend()
    got = backend.head_loop(head, z, x, noise, cfg, temperature)
    assert got.shape == want.shape and got.dtype == torch.float32
    return got, want


# --- the golden model's head ---------------------------------------------------------------

@pytest.mark.parametrize("cfg", [None, 3.0])
@pytest.mark.parametrize("n", [1, 5, 16])
def test_golden_head_loop_matches_reference(golden_model, cfg, n):
    head = golden_model.head
    assert (head.depth, head.width, head.token_dim) == (2, 96, 16)
    got, want = _both(head, n, cfg, temperature=0.9, seed=n)
    assert rel_err(got, want) <= TOL


@pytest.mark.parametrize("cfg", [None, 2.0])
def test_golden_head_loop_with_clip_range(golden_model, cfg):
    base = golden_model.head
    head = PackedHead.from_head(golden_model.mar.diffloss.net, base.tables, clip_range=(-1.0, 1.0))
    got, want = _both(head, 6, cfg, seed=3)
    assert rel_err(got, want) <= TOL
    # the clamp really acts here: without it the result differs
    unclipped, _ = _both(base, 6, cfg, seed=3)
    assert rel_err(unclipped, want) > 1e-2


@pytest.mark.parametrize("case", golden_cases("diffloss_sample"), ids=lambda c: c["name"])
def test_golden_head_sampling_cases(golden_native, case):
    out, want = run_golden_head_case(golden_native, case)
    assert rel_err(out, want) <= TOL


# --- random heads of other shapes ----------------------------------------------------------

def _random_head(depth, width, token_dim=16, cond_dim=48, steps="10", seed=0, clip=None):
    torch.manual_seed(seed)
    net = DiffusionHead(token_dim, cond_dim, width, depth).eval()
    with torch.no_grad():  # no zero-initialised layers: every path must matter
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return PackedHead.from_head(net, make_tables(steps), clip)


@pytest.mark.parametrize("depth,width,token_dim", [(0, 64, 16), (1, 80, 16), (3, 64, 4), (1, 1024, 16),
                                                   (2, 80, 3)])
@pytest.mark.parametrize("n", [1, 3, 17])
@pytest.mark.parametrize("cfg", [None, 4.0])
def test_random_heads(depth, width, token_dim, n, cfg):
    if width == 1024 and n == 17 and cfg is not None:
        n = 9  # keep the suite fast; 2n = 18 rows still exercises the parallel row split
    head = _random_head(depth, width, token_dim, seed=depth * 7 + width)
    got, want = _both(head, n, cfg, temperature=0.8, seed=n)
    assert rel_err(got, want) <= TOL


def test_parallel_rows_match_serial():
    # wide rows split across threads (the passes run rows in parallel, 16 rows per task at w=1024)
    head = _random_head(1, 1024, seed=4)
    z, x, noise = _inputs(head, 17, 2.0, seed=4)
    serial = NativeBackend().head_loop(head, z, x, noise, 2.0, 1.0)
    torch.set_num_threads(2)
    try:
        parallel = NativeBackend().head_loop(head, z, x, noise, 2.0, 1.0)
    finally:
        torch.set_num_threads(1)
    assert rel_err(parallel, serial) <= 1e-5
    want = ReferenceBackend().head_loop(head, z, x, noise, 2.0, 1.0)
    assert rel_err(parallel, want) <= TOL


def test_random_head_with_clip_and_odd_schedule():
    head = _random_head(2, 64, steps="7,3", seed=11, clip=(-0.5, 0.5))
    for cfg in (None, 1.5):
        got, want = _both(head, 3, cfg)
        assert rel_err(got, want) <= TOL


@pytest.mark.parametrize("budget", [1, 3 * 8 * 8 * 64 * 4, 1 << 30])
def test_step_chunking_does_not_change_results(budget):
    # the adaLN modulations are computed for chunks of diffusion steps; the chunk size only
    # changes which rows share a GEMM (1 step, 3 steps with a partial last chunk, all 10 steps);
    # 8 rows x (3*2+2)*64 modulations x 4 bytes per step
    head = _random_head(2, 64, seed=5)
    backend = NativeBackend(mod_budget_bytes=budget)
    assert backend.plan_for(head).chunk_steps(8) in (1, 3, 10)
    got, want = _both(head, 4, 2.0, backend=backend)
    assert rel_err(got, want) <= TOL


@pytest.mark.parametrize("stream_rows", [0, 16])
@pytest.mark.parametrize("gemm", ["aten", "mkl_packed", "onednn"])
def test_gemm_paths_agree(golden_model, gemm, stream_rows):
    backend = NativeBackend(gemm=gemm, small_gemm=gemm, stream_rows=stream_rows)
    got, want = _both(golden_model.head, 5, 2.5, backend=backend)   # 10 rows: the small-row kernel
    assert f"stream_rows={stream_rows if native_build.load_extension().has_small_gemm() else 0}" in \
        backend.describe(golden_model.head)
    assert rel_err(got, want) <= TOL


def test_default_gemm_paths(golden_model, monkeypatch):
    """float32 on an Intel CPU: MKL's packed sgemm (the plan reports what it built; a build
    without MKL would report aten); other vendors and bf16: oneDNN."""
    from engine.backends import native

    monkeypatch.setattr(native.packed_linear, "intel_cpu", lambda: True)
    backend = NativeBackend()
    assert backend.gemm == "mkl_packed"
    want = "mkl_packed" if native_build.load_extension().has_mkl_packed() else "aten"
    assert f"gemm={want}," in backend.describe(golden_model.head)
    assert NativeBackend(weight_dtype=torch.bfloat16).gemm == "onednn"
    monkeypatch.setattr(native.packed_linear, "intel_cpu", lambda: False)
    assert NativeBackend().gemm == "onednn"


@pytest.mark.parametrize("gemm", ["onednn", "onednn_widened"])
@pytest.mark.parametrize("n", [8, 40])   # 2n rows under CFG; 80: past the small-row kernel
def test_bf16_weights_are_close(golden_model, gemm, n):
    """bf16 head weights through oneDNN's bf16 kernels, or "widened" (oneDNN's float32 product of
    the bf16 values, rounded to bf16): what a CPU without bf16 kernels runs, and any CPU when
    asked."""
    from engine.ops.packed_linear import onednn_bf16_available

    backend = NativeBackend(weight_dtype=torch.bfloat16, gemm=gemm)
    built = "onednn" if gemm == "onednn" and onednn_bf16_available() else "onednn_widened"
    assert "bfloat16" in backend.describe(golden_model.head)
    assert f"gemm={built}," in backend.describe(golden_model.head)
    got, want = _both(golden_model.head, n, 3.0, backend=backend)
    assert torch.isfinite(got).all()
    assert rel_err(got, want) <= 0.1  # documented precision: bf16 weights and activations


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_bf16_precision_on_cpu(native_ext, backend):
    """precision="bf16" on CPU: transformer under bf16 autocast (and bf16 head weights for the
    native loop). Tokens move off the published float32 ones, but only at bf16's level
    (measured: <= 0.027 native, <= 0.008 reference, over the golden cases)."""
    model = engine.load(CHECKPOINT, backend=backend, precision="bf16")
    if backend == "native":
        assert model.backend.weight_dtype == torch.bfloat16
    for case in golden_cases("sample_tokens"):
        if case["params"].get("weights") == "model":  # the non-EMA weights: not loaded here
            continue
        out = _run_case(model, case)
        err = rel_err(out, golden_tensors()[case["name"] + ".tokens"])
        assert torch.isfinite(out).all()
        assert 1e-4 < err <= 0.06, (case["name"], err)  # reduced precision really ran, and stayed close


def test_bad_options_and_inputs(golden_model):
    with pytest.raises(ConfigError, match="weight_dtype"):
        NativeBackend(weight_dtype=torch.float16)
    with pytest.raises(ConfigError, match="gemm"):
        NativeBackend(gemm="cublas")
    head = golden_model.head
    z, x, noise = _inputs(head, 4, 2.0)
    with pytest.raises(RuntimeError, match="rows"):
        NativeBackend().head_loop(head, z, x, noise, None, 1.0)  # 8 rows of z for 4 tokens, no CFG
    with pytest.raises(RuntimeError, match="noise"):
        NativeBackend().head_loop(head, z, x, noise[:-1], 2.0, 1.0)


@pytest.mark.parametrize("cfg", [None, "rows"])
def test_per_row_cfg_and_temperature(golden_model, cfg):
    """One call with a CFG scale and a temperature per row: row r equals a call with row r's
    numbers (and the reference's per-row loop); a tensor of equal values equals the number."""
    head, n = golden_model.head, 5
    scales = torch.tensor([1.0, 2.5, 4.0, 1.7, 7.5]) if cfg else None
    temps = torch.tensor([0.9, 1.0, 0.5, 1.25, 0.05])
    z, x, noise = _inputs(head, n, scales, seed=9)
    native, ref = NativeBackend(), ReferenceBackend()
    got = native.head_loop(head, z, x, noise, scales, temps)
    want = ref.head_loop(head, z, x, noise, scales, temps)
    assert rel_err(got, want) <= TOL
    for r in range(n):
        number = None if cfg is None else float(scales[r])
        one = native.head_loop(head, z, x, noise, number, float(temps[r]))
        assert rel_err(got[r], one[r]) <= 1e-6, r
        assert torch.equal(want[r], ref.head_loop(head, z, x, noise, number, float(temps[r]))[r]), r
    for backend in (native, ref):  # equal values: bit for bit the number's result
        number = None if cfg is None else 2.7
        same = backend.head_loop(head, z, x, noise, None if cfg is None else torch.full((n,), 2.7),
                                 torch.full((n,), 0.8))
        assert torch.equal(same, backend.head_loop(head, z, x, noise, number, 0.8))


@pytest.mark.parametrize("backend", [NativeBackend, ReferenceBackend])
def test_bad_per_row_shapes(golden_model, backend):
    head = golden_model.head
    z, x, noise = _inputs(head, 4, 2.0)
    with pytest.raises(ValueError, match=r"cfg_scale .*shape \[4\].*\[8\]"):
        backend().head_loop(head, z, x, noise, torch.ones(8), 1.0)  # one per RESULT row
    with pytest.raises(ValueError, match=r"temperature .*shape \[4\].*\[4, 1\]"):
        backend().head_loop(head, z, x, noise, 2.0, torch.ones(4, 1))
    with pytest.raises(ValueError, match="temperature"):
        backend().head_loop(head, z, x, noise, 2.0, "hot")


def test_custom_op_schema_fake_and_compile(golden_model):
    """The op's schema and fake impl, and a fullgraph trace with per-row tensor arguments."""
    head = golden_model.head
    backend = NativeBackend()
    backend.prepare(head)
    z, x, noise = _inputs(head, 2, 2.0)
    scales, temps = torch.tensor([2.0, 3.0]), torch.tensor([1.0, 0.5])
    torch.library.opcheck(native_mod.native_head_loop, (backend._plan_id, z, x, noise, scales, temps))
    torch._dynamo.reset()
    compiled = torch.compile(backend.head_loop, fullgraph=True, backend="eager")
    assert torch.equal(compiled(head, z, x, noise, scales, temps),
                       backend.head_loop(head, z, x, noise, scales, temps))


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_rebinding_frees_plans(native_ext):
    """Superseded plans (and their packed weights) go when a backend re-plans or is collected:
    rebinds never grow _PLANS, and re-planning a head whose packed weights are large next to
    the allocator's noise does not grow the process's memory by even one plan."""
    backend = NativeBackend()
    backend.prepare(engine.load(CHECKPOINT, backend="reference").head)
    plan_id = backend._plan_id
    assert plan_id in native_mod._PLANS
    del backend
    assert plan_id not in native_mod._PLANS  # freed with its backend (no cycle holds it)

    model = engine.load(CHECKPOINT, backend="native")

    def rebind(i):
        nonlocal model
        model.set_backend("native")
        model.set_sampling_steps(("10", "25")[i % 2])
        model.backend.head_loop(model.head, *_inputs(model.head, 2, None), None, 1.0)
        model = engine.load(CHECKPOINT, backend="native")

    rebind(0)
    gc.collect()
    plans = len(native_mod._PLANS)
    for i in range(20):
        rebind(i)
        assert len(native_mod._PLANS) <= plans + 1
    gc.collect()
    assert len(native_mod._PLANS) <= plans

    # Memory: a width-512 head, re-planned each time (new step tables, new rows). Its float32
    # weights are ~23 MB, each plan holds them about three times over (GEMM copy, packed bytes,
    # small-row panels). Without a leak the peak moved by up to ~35 MB in 60 re-plans (when the
    # collector frees the superseded plan, the allocator's and MKL's caches), never growing.
    torch.manual_seed(0)
    net = DiffusionHead(16, 64, 512, 4).eval()
    weight_bytes = sum(p.numel() * 4 for p in net.parameters())

    def replan(i):
        steps = (10, 25)[i % 2]
        head = PackedHead.from_head(net, make_tables(str(steps)))
        backend = NativeBackend()
        rows = 2 * (1 + i % 5)
        backend.head_loop(head, torch.randn(rows, 64), torch.randn(rows // 2, 16),
                          torch.randn(steps, rows, 16), 2.0, 1.0)

    def peak_rss(first, count):  # the highest RSS between plans (it moves by ~1 plan with timing)
        peak = 0
        for i in range(first, first + count):
            replan(i)
            gc.collect()
            peak = max(peak, _rss_bytes())
        return peak

    before = peak_rss(0, 4)  # also the warm-up: allocator pools, lazily built caches
    growth = peak_rss(4, 12) - before
    # 12 leaked plans would add ~850 MB; what moves without a leak stays under one plan.
    assert growth < 3 * weight_bytes, \
        f"RSS grew by {growth / 2**20:.1f} MB over 12 plans of {weight_bytes / 2**20:.0f} MB weights"


def test_plan_follows_the_head(golden_model):
    backend = NativeBackend()
    backend.prepare(golden_model.head)
    other = _random_head(1, 64, cond_dim=64, seed=2)
    got, want = _both(other, 3, None, backend=backend)  # a different head: re-planned, not reused
    assert rel_err(got, want) <= TOL


# --- end to end: the golden sample_tokens cases --------------------------------------------

def _run_case(model, case):
    p = case["params"]
    torch.manual_seed(p["seed"])
    np.random.seed(p["seed"])
    labels = None if p["labels"] is None else torch.tensor(p["labels"])
    return model.sample_tokens(p["bsz"], p["num_iter"], p["cfg"], p["cfg_schedule"], labels,
                               p["temperature"])


@pytest.mark.parametrize("case", golden_cases("sample_tokens"), ids=lambda c: c["name"])
def test_sample_tokens_golden(golden_native, golden_raw_native, case):
    model = golden_raw_native if case["params"].get("weights") == "model" else golden_native
    assert model.backend_name == "native"
    out = _run_case(model, case)
    assert rel_err(out, golden_tensors()[f"{case['name']}.tokens"]) <= TOL


@pytest.mark.parametrize("name", ["run1", "run3"])
def test_sample_tokens_same_as_reference(native_ext, name):
    case = next(c for c in golden_cases("sample_tokens") if c["name"] == name)
    model = engine.load(CHECKPOINT, backend="reference")
    want = _run_case(model, case)
    model.set_backend("native")
    assert model.backend_name == "native"
    got = _run_case(model, case)
    assert rel_err(got, want) <= TOL
    # and the random-number stream is left where the reference leaves it
    model.set_backend("reference")
    _run_case(model, case)
    after_ref = torch.randn(3)
    model.set_backend("native")
    _run_case(model, case)
    assert torch.equal(torch.randn(3), after_ref)


# --- fallback when the extension cannot be built -------------------------------------------

@pytest.fixture
def broken_build(monkeypatch, native_ext):
    def fail(name, directory):
        raise RuntimeError("Error building extension 'engine_native':\n"
                           "head_loop.cpp:1:10: fatal error: simulated compiler failure")

    monkeypatch.setattr(native_build, "_compile", fail)
    monkeypatch.setattr(native_mod, "_warned", False)
    native_build.reset()
    yield
    monkeypatch.undo()
    native_build.reset()
    assert native_build.build_error() is None  # the real build is back for later tests


def test_auto_falls_back_with_one_warning(broken_build):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = engine.load(CHECKPOINT, backend="auto")
        again = engine.load(CHECKPOINT, backend="auto")
    # (a GPU backend could be picked instead where one exists; never the broken native one)
    assert model.backend_name != "native" and again.backend_name != "native"
    ours = [w for w in caught if issubclass(w.category, RuntimeWarning) and "native" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    message = str(ours[0].message)
    assert "simulated compiler failure" in message and "reference" in message
    assert not NativeBackend().available("cpu")


def test_native_by_name_raises_config_error(broken_build):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ConfigError, match="simulated compiler failure"):
            engine.load(CHECKPOINT, backend="native")
    assert not [w for w in caught if "native CPU backend" in str(w.message)]


def test_missing_compiler_is_named(monkeypatch, native_ext):
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    monkeypatch.setattr(native_mod, "_warned", True)
    native_build.reset()
    try:
        cause = native_build.build_error()
        assert cause is not None and "no C++ compiler" in cause and "no-such-compiler-xyz" in cause
        assert "no C++ compiler" in NativeBackend().unavailable_reason("cpu")
    finally:
        monkeypatch.undo()
        native_build.reset()
    assert native_build.build_error() is None


def test_disabled_by_environment(monkeypatch, native_ext):
    monkeypatch.setenv("ENGINE_NATIVE", "0")
    native_build.reset()
    try:
        assert "ENGINE_NATIVE=0" in native_build.build_error()
    finally:
        monkeypatch.undo()
        native_build.reset()


def test_not_for_other_devices():
    backend = NativeBackend()
    assert not backend.available(torch.device("meta"))
    assert "CPU only" in backend.unavailable_reason(torch.device("meta"))


@pytest.mark.parametrize("intel", [True, False])
def test_transformer_products_on_reordered_weights(native_ext, monkeypatch, intel):
    """The native backend also runs the transformer blocks' products on weights packed once
    (MKL's packed sgemm through the extension on Intel CPUs, oneDNN's reordered weights on
    others): the step's transformer pass matches plain F.linear to float32 rounding, the
    reference backend leaves the blocks unpacked."""
    from engine.ops import packed_linear
    from engine.models.mar import Linear

    if not packed_linear.onednn_available():
        pytest.skip("this torch build has no oneDNN")  # environment guard; CI's torch has it
    monkeypatch.setattr(packed_linear, "intel_cpu", lambda: intel)
    kind, op = ("mkl", "engine.mkl_packed_linear.default") if intel else \
        ("onednn", "mkldnn._linear_pointwise.default")
    model = engine.load(CHECKPOINT, backend="native")
    layers = [m for m in model.mar.modules() if isinstance(m, Linear)]
    assert layers and all(m.packs for m in layers)
    gen = torch.Generator().manual_seed(0)
    first, last = model.mar.decoder_blocks[0].attn.qkv, model.mar.decoder_blocks[-1].attn.qkv
    assert {k for m in layers for k, _, _ in m.packs.values()} == {kind}
    assert set(first.packs) == {(0, None)}  # a weight is packed once, as it is used
    assert set(last.packs) == {(0, first.in_features), (first.in_features, None)}
    x = torch.randn(3, 7, first.in_features, generator=gen)
    d = first.in_features
    for start, stop in ((0, None), (0, d), (d, None)):
        layer = first if stop is None and start == 0 else last
        want = torch.nn.functional.linear(x, layer.weight[start:stop], layer.bias[start:stop])
        torch.testing.assert_close(layer.rows(x, start, stop), want, rtol=1e-5, atol=1e-5)
    c = model.config
    tokens = torch.randn(2, c.seq_len, c.token_dim, generator=gen)
    order = torch.argsort(torch.rand(2, c.seq_len, generator=gen), dim=1)
    known, predict = order[:, :5].sort(dim=1).values, order[:, 5:].sort(dim=1).values
    class_emb = model.mar.class_embedding(torch.tensor([1, 2]), 2, False)
    from engine.core.counting import count_ops

    packed, counter = count_ops(model.mar.forward_step, tokens, known, predict, (class_emb,))
    model.mar.pack_linears(None)
    plain, plain_counter = count_ops(model.mar.forward_step, tokens, known, predict, (class_emb,))
    torch.testing.assert_close(packed, plain, rtol=1e-4, atol=1e-5)
    # The packed path really ran: every block product went through the packed GEMM (MKL's sums
    # are F.linear's, so the results can be bitwise equal: count the calls, not the values).
    # One product per packed layer, two for the last decoder block's qkv (its q and kv rows apart).
    assert counter.counts[op] == len(layers) + 1 and plain_counter.counts[op] == 0
    other = engine.load(CHECKPOINT, backend="reference")
    assert not any(m.packs for m in other.mar.modules() if isinstance(m, Linear))


def test_bf16_transformer_products_on_reordered_weights(native_ext):
    """precision="bf16" on the native backend: the blocks' products run on bfloat16 weights
    reordered once, and give what autocast's F.linear gives (the same oneDNN bf16 product)."""
    from engine.core.counting import count_ops
    from engine.models.mar import Linear
    from engine.ops.packed_linear import onednn_available

    if not onednn_available():
        pytest.skip("this torch build has no oneDNN")  # environment guard; CI's torch has it
    from engine.ops.packed_linear import onednn_bf16_available

    model = engine.load(CHECKPOINT, backend="native", precision="bf16")
    layers = [m for m in model.mar.modules() if isinstance(m, Linear)]
    # A CPU without oneDNN's bf16 kernels (AVX2 only) widens: oneDNN's float32 product of the
    # bf16 values, rounded to bf16.
    kind = "onednn" if onednn_bf16_available() else "widened"
    assert layers and all(m.packs and {p[0] for p in m.packs.values()} == {kind}
                          and m.pack_dtype == torch.bfloat16 for m in layers)
    gen = torch.Generator().manual_seed(1)
    c = model.config
    tokens = torch.randn(2, c.seq_len, c.token_dim, generator=gen)
    order = torch.argsort(torch.rand(2, c.seq_len, generator=gen), dim=1)
    known, predict = order[:, :6].sort(dim=1).values, order[:, 6:].sort(dim=1).values
    class_emb = model.mar.class_embedding(torch.tensor([3, 4]), 2, False)
    onednn = "mkldnn._linear_pointwise.default"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        packed, counter = count_ops(model.mar.forward_step, tokens, known, predict, (class_emb,))
        model.mar.pack_linears(None)
        plain, plain_counter = count_ops(model.mar.forward_step, tokens, known, predict, (class_emb,))
    assert counter.counts[onednn] == len(layers) + 1
    assert plain_counter.counts[onednn] == 0
    assert packed.dtype == plain.dtype
    # Same bf16 products; only oneDNN's blocking may differ from the unreordered call's.
    torch.testing.assert_close(packed.float(), plain.float(), rtol=2e-2, atol=2e-2)
    # Outside autocast a bf16-packed layer falls back to its float32 weights.
    layer = model.mar.decoder_blocks[0].mlp.fc1
    layer.pack(dtype=torch.bfloat16)
    x = torch.randn(5, layer.in_features, generator=gen)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
