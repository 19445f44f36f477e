"""The static plan: every step traces with fullgraph=True (no host sync, capturable), the
static-buffer (CUDA-graph) path gives the eager tokens, and the counting utility."""
import numpy as np
import pytest
import torch

from engine.backends import available_backends
from engine.core.counting import count_ops
from engine.core.runners import PlanSteps
from engine.families.mar import MARModel
from engine.core.plan import build_plan
from engine.core.conditioning import Condition
from engine.core.loop import draw_step_inputs, run_step, sample_orders
from helpers import random_mar

TINY = dict(img_size=48, encoder_depth=1, decoder_depth=2, diffloss_d=1, diffloss_w=32,
            num_sampling_steps="3")  # 3x3 = 9 tokens: few distinct steps, quick to trace


def compile_matrix():
    """The full plan matrix for the native ops (the reference without them); one plan for each
    other backend (Triton runs in its slow interpreter here)."""
    names = available_backends("cpu", include_interpreted=True)
    full = "native" if "native" in names else "reference"
    cases = [(full, bsz, cfg, (8, 64), "fp32") for bsz in (1, 4) for cfg in (1.0, 3.0)]
    cases += [(full, 2, 3.0, (8,), "bf16")]  # autocast transformer and bf16 head weights
    return cases + [(name, 2, 3.0, (8,), "fp32") for name in names if name != full]


@pytest.fixture(scope="module")
def tiny_mar():
    return random_mar(0, **TINY)


def test_plan_is_cached_and_static():
    a, b = build_plan(4, 64, 256, 3.0, "linear"), build_plan(4, 64, 256, 3.0, "linear")
    assert a is b
    assert sum(s.num_predict for s in a.steps) == 256
    assert all(s.num_predict > 0 for s in a.steps)
    assert a.steps[-1].unknown_after == 0
    # Linear CFG grows from ~1 towards cfg; the last step uses mask_len 1 (published).
    assert a.steps[0].cfg_scale < a.steps[-1].cfg_scale == pytest.approx(1 + 2.0 * 255 / 256)


@pytest.mark.parametrize("backend,bsz,cfg,iters,precision", compile_matrix())
def test_every_distinct_step_compiles_fullgraph(tiny_mar, backend, bsz, cfg, iters, precision):
    torch._dynamo.reset()
    # Each distinct step is its own graph (shapes and the CFG scale are baked in).
    with torch._dynamo.config.patch(recompile_limit=4096):
        check_steps_compile(tiny_mar, backend, bsz, cfg, iters, precision)


def check_steps_compile(tiny_mar, backend, bsz, cfg, iters, precision="fp32"):
    model = MARModel(tiny_mar, backend=backend, precision=precision)
    seq_len, dim = model.config.seq_len, model.config.token_dim
    gen = torch.Generator().manual_seed(0)
    orders = sample_orders(bsz, seq_len, gen, "cpu")
    condition = Condition.labels(torch.arange(bsz) % model.config.class_num, bsz, model.config.class_num, "cpu")
    # Per-image settings: rows with different cfg scales and temperatures share the step.
    cfgs = [cfg + 0.5 * i if cfg != 1.0 else 1.0 for i in range(bsz)]
    temperatures = torch.tensor([0.9 + 0.05 * i for i in range(bsz)])
    seen = set()
    for num_iter in iters:
        plan = build_plan(bsz, num_iter, seq_len, cfgs)
        context = model.mar.step_context(condition, bsz, plan.use_cfg, model.mar.grid())
        cfg_table = plan.cfg_table("cpu")
        for k, step in enumerate(plan.steps):
            if (step.unknown_before, step.unknown_after) in seen:
                continue
            seen.add((step.unknown_before, step.unknown_after))
            x, noise = draw_step_inputs(model.head, plan, step, gen, "cpu", dim)
            tokens = torch.randn(bsz, seq_len, dim, generator=gen)

            def one_step(tokens, orders, context, scales, x, noise, plan=plan, step=step):
                run_step(model, plan, step, tokens, orders, context, scales, temperatures, x, noise)
                return tokens

            compiled = torch.compile(one_step, fullgraph=True, backend="eager", dynamic=False)
            args = (orders, context, cfg_table[k], x, noise)
            got = compiled(tokens.clone(), *args)
            (want, counter) = count_ops(one_step, tokens.clone(), *args)
            assert counter.host_syncs == 0
            assert not any("nonzero" in op or "item" in op for op in counter.counts)
            tol = 1e-5 if precision == "fp32" else 2e-2
            torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    assert len(seen) >= (9 if 64 in iters else 7)


@pytest.mark.parametrize("cfg", [1.0, 2.0])
def test_static_buffer_runner_matches_eager(tiny_mar, cfg, monkeypatch):
    model = MARModel(tiny_mar, backend="reference")
    runs = {}
    for label, factory in (("eager", None),
                           ("static", lambda plan, grid: PlanSteps(model, plan, grid, capture=False))):
        if factory is not None:
            runners = {}
            monkeypatch.setattr(model, "step_runner",
                                lambda plan, grid: runners.setdefault(plan.shape_key, factory(plan, grid)))
        outs = []
        for seed in (0, 1):  # the second call reuses the static buffers
            torch.manual_seed(seed)
            np.random.seed(seed)
            outs.append(model.sample_tokens(3, num_iter=6, cfg=cfg, labels=[0, 1, 2]))
        runs[label] = outs
    for a, b in zip(runs["eager"], runs["static"]):
        assert torch.equal(a, b)


def test_counter_counts_ops_and_syncs():
    x = torch.arange(6.0)
    _, counter = count_ops(lambda: (x * 2 + 1).sum().item())
    assert counter.counts["aten.mul.Tensor"] == 1 and counter.host_syncs == 1
    _, counter = count_ops(lambda: x.view(2, 3)[0].nonzero())
    assert counter.host_syncs == 1 and "aten.view.default" not in counter.counts


@pytest.mark.parametrize("cfg,texts", [(1.0, True), (3.0, True), (2.0, False)])
def test_every_distinct_fluid_step_compiles_fullgraph(cfg, texts):
    """Fluid's steps (empty encoder at the first step, cross-attention to the per-call text K/V,
    a non-square interpolated grid) trace with fullgraph=True and no host synchronisation."""
    from engine.families.fluid import FluidModel
    from helpers import random_fluid

    torch._dynamo.reset()
    backend = "native" if "native" in available_backends("cpu") else "reference"
    model = FluidModel(random_fluid(0, num_sampling_steps="3"), backend=backend)
    c, bsz, grid = model.config, 2, model.mar.grid(64, 96)   # 4 x 6 tokens
    seq_len = grid[0] * grid[1]
    gen = torch.Generator().manual_seed(0)
    text = torch.randn(bsz, c.max_length, c.caption_channels, generator=gen) if texts else None
    condition = Condition.text(text, bsz, c.max_length, c.caption_channels, "cpu")
    plan = build_plan(bsz, 8, seq_len, cfg)
    context = model.mar.step_context(condition, bsz, plan.use_cfg, grid)
    orders = sample_orders(bsz, seq_len, gen, "cpu")
    temperatures = torch.tensor([1.0, 0.9])
    with torch._dynamo.config.patch(recompile_limit=4096):
        for k, step in enumerate(plan.steps):
            x, noise = draw_step_inputs(model.head, plan, step, gen, "cpu", c.token_dim)
            tokens = torch.randn(bsz, seq_len, c.token_dim, generator=gen)

            def one_step(tokens, orders, context, scales, x, noise, step=step):
                run_step(model, plan, step, tokens, orders, context, scales, temperatures, x, noise)
                return tokens

            args = (orders, context, plan.cfg_table("cpu")[k], x, noise)
            got = torch.compile(one_step, fullgraph=True, backend="eager", dynamic=False)(tokens.clone(), *args)
            want, counter = count_ops(one_step, tokens.clone(), *args)
            assert counter.host_syncs == 0
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert plan.steps[0].unknown_before == seq_len   # the first step: nothing known, empty encoder


@pytest.mark.parametrize("backend", sorted({"reference", *(["native"] if "native" in available_backends("cpu") else [])}))
def test_fast_disa_and_lazy_steps_compile_fullgraph_without_host_syncs(tiny_mar, backend):
    """fast="disa+lazy": every step (full, refreshing the lazy cache, lazy; each with its own
    head length) traces with fullgraph=True on the call's static buffers, no host sync, and
    gives the eager step's tokens and cache."""
    from engine.core.fast import parse_fast
    from engine.core.loop import LazyCache

    torch._dynamo.reset()
    model = MARModel(tiny_mar, backend=backend)
    model.set_sampling_steps("12")
    bsz, seq_len, dim = 2, model.config.seq_len, model.config.token_dim
    gen = torch.Generator().manual_seed(0)
    plan = build_plan(bsz, 8, seq_len, [3.0, 2.0], fast=parse_fast({"disa": {"upper": 12, "lower": 2},
                                                                   "lazy": {"start": 1, "every": 2}}),
                      model_steps=model.head.num_steps)
    assert any(s.lazy for s in plan.steps) and any(s.refresh for s in plan.steps)
    orders = sample_orders(bsz, seq_len, gen, "cpu")
    condition = Condition.labels(torch.tensor([0, 1]), bsz, model.config.class_num, "cpu")
    context = model.mar.step_context(condition, bsz, True, model.mar.grid())
    temperatures, cfg_table = torch.tensor([1.0, 0.9]), plan.cfg_table("cpu")
    eager_cache, compiled_cache = LazyCache.of(model, plan), LazyCache.of(model, plan)
    eager_tokens = torch.zeros(bsz, seq_len, dim)
    compiled_tokens = eager_tokens.clone()
    with torch._dynamo.config.patch(recompile_limit=64):
        for k, step in enumerate(plan.steps):
            x, noise = draw_step_inputs(model.head_for(step.head_steps), plan, step, gen, "cpu", dim)

            def one_step(tokens, orders, scales, x, noise, cache, step=step):
                run_step(model, plan, step, tokens, orders, context, scales, temperatures, x, noise, cache)
                return tokens

            compiled = torch.compile(one_step, fullgraph=True, backend="eager", dynamic=False)
            compiled(compiled_tokens, orders, cfg_table[k], x, noise, compiled_cache)
            _, counter = count_ops(one_step, eager_tokens, orders, cfg_table[k], x, noise, eager_cache)
            assert counter.host_syncs == 0, step
            assert not any("nonzero" in op or "item" in op for op in counter.counts)
            torch.testing.assert_close(compiled_tokens, eager_tokens, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(compiled_cache.diff, eager_cache.diff, rtol=1e-5, atol=1e-5)
