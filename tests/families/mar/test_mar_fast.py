"""fast= on the diffusion-head families: DiSA (per-step head lengths in the plan, every backend)
and LazyMAR's condition redundancy, each against a re-statement of the method written here with
the engine's public pieces; exact mode unchanged; refusals. The built-in models are the subjects
(small, shipped, trained: a step's numbers are realistic)."""
import numpy as np
import pytest
import torch

import engine
from engine.backends import available_backends
from engine.core.conditioning import Condition
from engine.core.errors import SamplingError
from engine.core.fast import DiSA, parse_fast
from engine.core.loop import transformer_pass
from engine.core.plan import build_plan
from engine.core.rng import _draw_one, sample_orders
from engine.ops.diffusion import make_tables
from engine.ops.head import PackedHead

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    return engine.load("digits", backend="reference")


def gens(n, seed=0):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def test_exact_and_default_give_the_same_tokens(digits):
    a = digits.sample_tokens(3, num_iter=4, cfg=2.0, labels=[1, 2, 3], generator=gens(3))
    b = digits.sample_tokens(3, num_iter=4, cfg=2.0, labels=[1, 2, 3], generator=gens(3), fast="exact")
    assert torch.equal(a, b)
    images = engine.generate(digits, [1, 2], num_iter=4, generator=gens(2), output_type="pt", fast=None)
    assert torch.equal(images, engine.generate(digits, [1, 2], num_iter=4, generator=gens(2), output_type="pt"))


def restated_encoder(mar, tokens, known, rows, class_emb, cache):
    """LazyMAR's encoder re-stated with masks over all buffer + L rows: the rows `rows`
    (positions) and the buffer are computed and their keys / values / outputs written into
    `cache`; every row attends to the cached keys of the buffer and the `known` positions.
    Returns the output rows of the buffer and `known`, the others read from the cache."""
    c = mar.config
    buf, length, e, heads = c.buffer_size, c.seq_len, c.encoder_embed_dim, c.encoder_num_heads
    b, hd = tokens.shape[0], e // heads
    pos = mar.encoder_pos_embed_learned
    x = mar.z_proj_ln(torch.cat([class_emb[:, None] + pos[:, :buf], mar.z_proj(tokens) + pos[:, buf:]], 1))
    compute = torch.zeros(b, buf + length, dtype=torch.bool)
    compute[:, :buf] = True
    compute.scatter_(1, rows + buf, True)
    visible = torch.zeros_like(compute)
    visible[:, :buf] = True
    visible.scatter_(1, known + buf, True)
    if not cache:
        cache.update(k=[torch.zeros(b, heads, buf + length, hd) for _ in mar.encoder_blocks],
                     v=[torch.zeros(b, heads, buf + length, hd) for _ in mar.encoder_blocks],
                     out=torch.zeros(b, buf + length, e))
    for i, block in enumerate(mar.encoder_blocks):
        q, k, v = block.attn.qkv(block.norm1(x)).reshape(b, -1, 3, heads, hd).permute(2, 0, 3, 1, 4)
        cache["k"][i] = torch.where(compute[:, None, :, None], k, cache["k"][i])
        cache["v"][i] = torch.where(compute[:, None, :, None], v, cache["v"][i])
        scores = (q @ cache["k"][i].transpose(-1, -2)) * hd ** -0.5
        attn = torch.softmax(scores.masked_fill(~visible[:, None, None, :], float("-inf")), -1)
        x = x + block.attn.proj((attn @ cache["v"][i]).transpose(1, 2).reshape(b, -1, e))
        x = x + block.mlp(block.norm2(x))
    cache["out"] = torch.where(compute[..., None], mar.encoder_norm(x), cache["out"])
    keep = torch.cat([torch.arange(buf).expand(b, -1), known + buf], 1)
    return torch.gather(cache["out"], 1, keep[..., None].expand(-1, -1, e))


def restated_sample(model, labels, num_iter, cfg, generator, disa=None, lazy=None):
    """MAR's masked loop written out with DiSA's per-step head (DiffLoss.sample: the step's
    respacing `str(steps)`, p_sample_loop) and LazyMAR's condition redundancy (lazy steps: the
    conditional half only, its encoder on the buffer and the tokens predicted at the step
    before, over keys / values cached at the last full step; null = cond + the difference
    cached at the last full step, for every position). One generator, the engine's draw order."""
    bsz, dim, seq_len = len(labels), model.config.token_dim, model.config.seq_len
    plan = build_plan(bsz, num_iter, seq_len, cfg)
    orders = sample_orders(bsz, seq_len, generator, "cpu")
    condition = Condition.labels(labels, bsz, model.config.class_num, "cpu")
    context = model.mar.step_context(condition, bsz, True, model.mar.grid())
    tokens = torch.zeros(bsz, seq_len, dim)
    cache, previous = {}, None
    diff = torch.zeros(bsz, seq_len, model.config.decoder_embed_dim)
    clip = model.config.clip_range if model.config.clip_denoised else None
    for step in plan.steps:
        s = step.step
        steps = disa.steps(s, num_iter, model.head.num_steps) if disa else model.head.num_steps
        head = PackedHead.from_head(model.mar.diffloss.net, make_tables(str(steps)), clip)
        known = torch.sort(orders[:, step.unknown_before:], 1).values
        predict = torch.sort(orders[:, step.unknown_after:step.unknown_before], 1).values
        everything = torch.sort(orders[:, :step.unknown_before], 1).values
        is_lazy = lazy is not None and s > 0 and not lazy.fresh(s, num_iter)
        if is_lazy:
            x_cond = restated_encoder(model.mar, tokens, known, previous, context[0][:bsz], cache)
            zc = model.mar.decode(x_cond, known, predict)
            zn = zc + torch.gather(diff, 1, predict[..., None].expand(-1, -1, diff.shape[-1]))
        elif lazy is not None:
            x = torch.cat([restated_encoder(model.mar, tokens, known, known, context[0][:bsz], cache),
                           model.mar.encode(tokens, known, context[0][bsz:])])
            z_all = model.mar.decode(x, known.repeat(2, 1), everything.repeat(2, 1))
        else:
            z_all = transformer_pass(model, torch.cat([tokens, tokens]), known.repeat(2, 1),
                                     everything.repeat(2, 1), context)
        if not is_lazy:
            zc_all, zn_all = z_all.chunk(2)
            diff.scatter_(1, everything[..., None].expand(-1, -1, diff.shape[-1]), zn_all - zc_all)
            pick = lambda z: torch.stack([z[b][torch.isin(everything[b], predict[b])] for b in range(bsz)])  # noqa: E731
            zc, zn = pick(zc_all), pick(zn_all)
        z = torch.cat([zc, zn]).reshape(-1, zc.shape[-1])
        x, noise = _draw_one(head.num_steps, bsz * step.num_predict, dim, True, generator, "cpu")
        scales = torch.tensor(step.cfg_scales).repeat_interleave(step.num_predict)
        out = model.backend.head_loop(head, z, x, noise, scales, 1.0)
        tokens.scatter_(1, predict[..., None].expand(-1, -1, dim), out.view(bsz, -1, dim))
        previous = predict
    return model.mar.unpatchify(tokens, model.mar.grid())


@pytest.mark.parametrize("mode", ["disa", "lazy", "disa+lazy", {"disa": {"upper": 30, "lower": 3,
                                                                       "schedule": "cosine"}}])
def test_fast_modes_equal_their_restatement(digits, mode):
    fast = parse_fast(mode)
    want = restated_sample(digits, [0, 4, 7], 8, 2.0, torch.Generator().manual_seed(3), fast.disa, fast.lazy)
    got = digits.sample_tokens(3, num_iter=8, cfg=2.0, labels=[0, 4, 7], generator=torch.Generator().manual_seed(3),
                               fast=mode)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    exact = digits.sample_tokens(3, num_iter=8, cfg=2.0, labels=[0, 4, 7], generator=torch.Generator().manual_seed(3))
    assert not torch.allclose(got, exact, atol=1e-3)      # it is another sampler


def test_disa_heads_share_the_weights_and_run_the_published_lengths(digits, monkeypatch):
    lengths = []
    loop = digits.backend.head_loop
    monkeypatch.setattr(digits.backend, "head_loop", lambda head, *a: lengths.append(head.num_steps) or loop(head, *a))
    digits.sample_tokens(2, num_iter=8, cfg=2.0, labels=[0, 1], generator=gens(2), fast="disa")
    assert lengths == [DiSA().steps(s, 8, 50) for s in range(8)] == [50, 43, 37, 30, 24, 17, 11, 5]
    head = digits.head_for(11)
    assert head is digits.head_for(11) and digits.head_for(50) is digits.head and head.base is digits.head
    assert head.fc1_weight is digits.head.fc1_weight and head.ada_weight is digits.head.ada_weight
    tables = make_tables("11")
    assert torch.equal(head.table, tables.as_tensor()) and head.timestep_map.tolist() == tables.timestep_map.tolist()
    with torch.no_grad():
        torch.testing.assert_close(head.time_emb, digits.mar.diffloss.net.time_embed(head.timestep_map))


@pytest.mark.parametrize("backend", [b for b in ("native", "triton") if b in available_backends("cpu")])
def test_disa_on_every_backend_agrees_with_the_reference(digits, backend):
    other = engine.load("digits", backend=backend)
    for mode in ("disa", "disa+lazy"):
        want = digits.sample_tokens(4, num_iter=8, cfg=2.0, labels=[0, 1, 2, 3], generator=gens(4), fast=mode)
        got = other.sample_tokens(4, num_iter=8, cfg=2.0, labels=[0, 1, 2, 3], generator=gens(4), fast=mode)
        torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)


def test_lazy_without_cfg_is_exact(digits):
    """LazyMAR's redundancies need the guided null half here: without CFG nothing is skipped."""
    a = digits.sample_tokens(2, num_iter=8, cfg=1.0, labels=[5, 6], generator=gens(2), fast="lazy")
    assert torch.equal(a, digits.sample_tokens(2, num_iter=8, cfg=1.0, labels=[5, 6], generator=gens(2)))


def test_disa_images_share_a_batch_with_exact_ones(digits):
    """Serving: per-request modes; each image as its own sample_tokens call gives it."""
    batcher = digits.batcher()
    settings = {m: digits.resolve_settings(num_iter=6, cfg=2.0, fast=m) for m in ("exact", "disa")}
    a = batcher.add(label=3, settings=settings["disa"], generator=torch.Generator().manual_seed(1))
    b = batcher.add(label=4, settings=settings["exact"], generator=torch.Generator().manual_seed(2))
    live = [a, b]
    while live:
        done = batcher.step(live)
        live = [im for im in live if im not in done]
    for image, label, seed, mode in ((a, 3, 1, "disa"), (b, 4, 2, "exact")):
        alone = digits.sample_tokens(1, num_iter=6, cfg=2.0, labels=[label],
                                     generator=[torch.Generator().manual_seed(seed)], fast=mode)
        torch.testing.assert_close(batcher.tokens([image]), alone, rtol=1e-5, atol=1e-5)
    with pytest.raises(SamplingError, match="fast: 'lazy' keeps per-call caches"):
        batcher.add(label=1, settings=digits.resolve_settings(cfg=2.0, fast="lazy"), generator=torch.Generator())


def test_bad_fast_values_are_refused_naming_the_family(digits):
    with pytest.raises(SamplingError, match="fast: mar models cannot use 'speculative'; the fast modes of mar "
                                            "are: exact, disa, lazy"):
        digits.sample_tokens(1, labels=[0], fast="speculative")
    with pytest.raises(SamplingError, match="fast: unknown mode 'turbo'"):
        engine.generate(digits, [0], fast="turbo")
    assert digits.resolve_settings(fast={"disa": {"upper": 9}})["fast"] == {"disa": {"upper": 9, "lower": 5,
                                                                                     "schedule": "linear"}}


def test_fluid_and_causal_take_their_modes():
    text = engine.load("digits-text", backend="reference")
    prompts = ["a 3 left of a 7", "a 1"]
    exact = engine.generate(text, prompts=prompts, generator=gens(2), output_type="pt", num_iter=4)
    same = engine.generate(text, prompts=prompts, generator=gens(2), output_type="pt", num_iter=4, fast="exact")
    assert torch.equal(exact, same)
    fast = engine.generate(text, prompts=prompts, generator=gens(2), output_type="pt", num_iter=4, fast="disa+lazy")
    assert fast.shape == exact.shape and torch.isfinite(fast).all() and not torch.equal(fast, exact)

    causal = engine.load("digits-causal", backend="reference")
    lengths = []
    loop = causal.backend.head_loop
    causal.backend.head_loop = lambda head, *a: lengths.append(head.num_steps) or loop(head, *a)
    try:
        tokens = causal.sample_tokens(2, labels=[1, 2], cfg=2.0, generator=gens(2), fast="disa")
    finally:
        del causal.backend.head_loop
    length, own = causal.config.seq_len, causal.head.num_steps
    assert lengths == [DiSA().steps(s, length, own) for s in range(length)] and lengths[-1] == 5
    assert torch.isfinite(tokens).all()
    with pytest.raises(SamplingError, match="fast: causal models cannot use 'lazy'"):
        causal.sample_tokens(1, labels=[0], fast="lazy")
    # the causal batcher runs DiSA images beside exact ones, each as its own call
    batcher = causal.batcher()
    im = batcher.add(label=1, settings=causal.resolve_settings(cfg=2.0, fast="disa"),
                     generator=torch.Generator().manual_seed(5))
    other = batcher.add(label=2, settings=causal.resolve_settings(cfg=2.0), generator=torch.Generator().manual_seed(6))
    live = [im, other]
    while live:
        done = batcher.step(live)
        live = [x for x in live if x not in done]
    alone = causal.sample_tokens(1, labels=[1], cfg=2.0, generator=[torch.Generator().manual_seed(5)], fast="disa")
    torch.testing.assert_close(batcher.tokens([im]), alone, rtol=1e-5, atol=1e-5)
    assert np.isfinite(batcher.tokens([other]).numpy()).all()
