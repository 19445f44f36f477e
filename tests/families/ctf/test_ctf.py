"""CTF (coarse-to-fine, arXiv 2503.16194): each stage against a plain-torch re-statement of the
paper's procedure written here from the weights (explicit-softmax attention, complex RoPE, full
recompute without a KV cache), the cluster map, the engine-ctf directory format, the graph-safe
steps, per-image generators and the training losses."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import engine
from engine.core.counting import count_ops
from engine.core.errors import CheckpointError, ConfigError, SamplingError
from engine.families.ctf import CTFConfig, CTFModel, save_ctf
from engine.models.ctf import CTFModule, bae_codewords, kmeans_cluster_map, subtokens_to_codes
from engine.builtin.train_ctf import CTFTask, ctf_losses, init_ctf_weights

pytestmark = pytest.mark.usefixtures("one_thread")

DATA_BAE = __import__("pathlib").Path(__file__).resolve().parents[2] / "data" / "elm" / "binaryae_ema.th"
CONFIG = dict(num_classes=5, block_size=16, token_each=2, code_dim=4, num_clusters=8,
              stage1=dict(dim=32, n_layer=2, n_head=2, n_kv_head=1, multiple_of=16),
              stage2=dict(dim=32, n_layer=2, n_head=2, multiple_of=16, norm_eps=1e-6, rope_base=500.0))


def make_model(seed=0) -> CTFModel:
    torch.manual_seed(seed)
    module = CTFModule(CTFConfig.from_dict(CONFIG))
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.3)       # peaked, varied distributions
    codewords = torch.randn(256, 6, generator=torch.Generator().manual_seed(seed))
    module.cluster_of.copy_(kmeans_cluster_map(codewords, 8, seed=0))
    return CTFModel(module)


@pytest.fixture(scope="module")
def model():
    return make_model()


# The plain re-statement -------------------------------------------------------------------------------
def rope_complex(grid, head_dim, base):
    """[1 + grid^2, head_dim // 2] complex rotations: first half of the pairs by row, second by
    column; the class position's row is 0 (zero q and k, as ELM)."""
    quarter = head_dim // 4
    inv = 1.0 / base ** (torch.arange(quarter).float() * 2 / (head_dim // 2))
    rows, cols = torch.div(torch.arange(grid * grid), grid, rounding_mode="floor"), torch.arange(grid * grid) % grid
    angles = torch.cat([rows[:, None].float() * inv, cols[:, None].float() * inv], dim=1)
    table = torch.polar(torch.ones_like(angles), angles)
    return torch.cat([torch.zeros(1, head_dim // 2, dtype=table.dtype), table])


def rotate(x, freqs):
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(xc * freqs[None, :, None, :]).flatten(-2)


def rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def plain_stack(state, p, h, stage, causal):
    """The transformer layers + final norm of one stage, from its weights."""
    n_head, n_kv = stage["n_head"], stage.get("n_kv_head") or stage["n_head"]
    eps, d = stage.get("norm_eps", 1e-5), h.shape[-1]
    hd = d // n_head
    freqs = rope_complex(int(math.isqrt(CONFIG["block_size"])), hd, stage.get("rope_base", 10000.0))[: h.shape[1]]
    s = h.shape[1]
    mask = torch.ones(s, s, dtype=torch.bool).tril() if causal else torch.ones(s, s, dtype=torch.bool)
    for i in range(stage["n_layer"]):
        lp = f"{p}layers.{i}."
        x = rms(h, state[lp + "attention_norm.weight"], eps)
        qkv = x @ state[lp + "attention.wqkv.weight"].T
        q, k, v = qkv.split([d, n_kv * hd, n_kv * hd], dim=-1)
        q = rotate(q.view(*q.shape[:2], n_head, hd), freqs).transpose(1, 2)
        k = rotate(k.view(*k.shape[:2], n_kv, hd), freqs).transpose(1, 2).repeat_interleave(n_head // n_kv, 1)
        v = v.view(*v.shape[:2], n_kv, hd).transpose(1, 2).repeat_interleave(n_head // n_kv, 1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        att = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1) @ v
        h = h + att.transpose(1, 2).reshape(h.shape) @ state[lp + "attention.wo.weight"].T
        x = rms(h, state[lp + "ffn_norm.weight"], eps)
        ff = F.silu(x @ state[lp + "feed_forward.w1.weight"].T) * (x @ state[lp + "feed_forward.w3.weight"].T)
        h = h + ff @ state[lp + "feed_forward.w2.weight"].T
    return rms(h, state[p + "norm.weight"], eps)


def top_k_filter(logits, k):
    if k is None:
        return logits
    kth = logits.sort(-1, descending=True).values[..., min(k, logits.shape[-1]) - 1: min(k, logits.shape[-1])]
    return torch.where(logits < kth, torch.full_like(logits, float("-inf")), logits)


def plain_sample(model, labels, cfg, temps, top_k, gen, restrict=True, schedule="constant"):
    """CTF's two stages re-stated: stage 1 recomputes the whole prefix every step; stage 2 one
    bidirectional pass; noise drawn from `gen` in the same order (stage 1 steps, then stage 2)."""
    c, state = model.config, {k: v.float() for k, v in model.module.state_dict().items()}
    (c1, c2), (t1, t2), (k1, k2) = cfg, temps, top_k
    bsz, length, null = len(labels), c.block_size, c.num_classes
    labels = torch.tensor(labels)
    col = lambda v, nd: torch.tensor(v, dtype=torch.float32).view(-1, *([1] * nd))  # noqa: E731
    rows = torch.cat([labels, torch.full_like(labels, null)])
    coarse = torch.zeros(bsz, 0, dtype=torch.int64)
    for step in range(length):
        ratio = (step + 1) / length
        s = [x if schedule == "constant" else 1.0 + (x - 1.0) * ratio for x in c1]
        h = torch.cat([state["stage1.cls_embedding.embedding_table.weight"][rows][:, None],
                       state["stage1.tok_embedder.weight"][torch.cat([coarse, coarse])]], 1)
        logits = plain_stack(state, "stage1.", h, CONFIG["stage1"], causal=True)[:, -1] @ state["stage1.output.weight"].T
        cond, unc = logits[:bsz], logits[bsz:]
        logits = top_k_filter((unc + (cond - unc) * col(s, 1)) / col(t1, 1), k1)
        probs = torch.softmax(logits, -1)
        noise = torch.empty(bsz, c.num_clusters).exponential_(1, generator=gen)
        coarse = torch.cat([coarse, (probs / noise).argmax(-1, keepdim=True)], 1)
    h = torch.cat([state["stage2.cls_embedding.embedding_table.weight"][rows][:, None],
                   state["stage2.tok_embedder.weight"][torch.cat([coarse, coarse])]], 1)
    hidden = plain_stack(state, "stage2.", h, CONFIG["stage2"], causal=False)[:, 1:]
    sub = torch.stack([hidden @ state[f"stage2.output.{i}.weight"].T for i in range(c.token_each)], 2)
    cond, unc = sub[:bsz], sub[bsz:]
    sub = unc + (cond - unc) * col(c2, 3)                                  # [B, L, T, Vs]
    if not restrict:
        logits = top_k_filter(sub.reshape(bsz, length * c.token_each, -1) / col(t2, 2), k2)
        noise = torch.empty(bsz, length * c.token_each * c.sub_vocab).exponential_(1, generator=gen)
        pick = (torch.softmax(logits, -1) / noise.view(bsz, length * c.token_each, -1)).argmax(-1)
        return coarse, pick.view(bsz, length, c.token_each)
    cluster_of = model.cluster_of.tolist()
    members = [[v for v in range(c.codebook_size) if cluster_of[v] == k] for k in range(c.num_clusters)]
    width = max(len(m) for m in members)
    noise = torch.empty(bsz, length * width).exponential_(1, generator=gen).view(bsz, length, width)
    fine = torch.zeros(bsz, length, c.token_each, dtype=torch.int64)
    for b in range(bsz):
        for j in range(length):
            codes = members[int(coarse[b, j])]
            joint = torch.full((width,), float("-inf"))
            for slot, v in enumerate(codes):
                joint[slot] = sub[b, j, 0, v >> c.code_dim] + sub[b, j, 1, v & (c.sub_vocab - 1)]
            probs = torch.softmax(top_k_filter(joint / t2[b], k2), -1)
            v = codes[int((probs / noise[b, j]).argmax())]
            fine[b, j] = torch.tensor([v >> c.code_dim, v & (c.sub_vocab - 1)])
    return coarse, fine


# The two stages against the re-statement --------------------------------------------------------------
@pytest.mark.parametrize("settings", [
    dict(cfg=(2.0, 2.0), temps=(1.1, 1.1), top_k=(None, None), restrict=True, schedule="constant"),
    dict(cfg=([2.0, 3.0, 1.5], [1.5, 2.5, 4.0]), temps=([1.0, 0.8, 1.2], [1.3, 1.0, 0.7]), top_k=(5, 12),
         restrict=True, schedule="linear"),
    dict(cfg=(3.0, 2.0), temps=(0.9, 1.1), top_k=(4, 6), restrict=False, schedule="constant"),
])
def test_both_stages_equal_the_plain_restatement(model, settings):
    labels = [0, 3, 4]
    s = settings
    expand = lambda v: v if isinstance(v, list) else [v] * 3  # noqa: E731
    cfg, temps = tuple(expand(v) for v in s["cfg"]), tuple(expand(v) for v in s["temps"])
    want_coarse, want_fine = plain_sample(model, labels, cfg, temps, s["top_k"], torch.Generator().manual_seed(7),
                                          s["restrict"], s["schedule"])
    coarse, fine = model.sample(3, labels=labels, cfg=s["cfg"], temperature=s["temps"], top_k=s["top_k"],
                                restrict=s["restrict"], cfg_schedule=s["schedule"],
                                generator=torch.Generator().manual_seed(7))
    assert torch.equal(coarse, want_coarse), f"{(coarse != want_coarse).sum()} coarse labels differ"
    assert torch.equal(fine, want_fine), f"{(fine != want_fine).sum()} fine sub-tokens differ"
    assert fine.shape == (3, 16, 2) and fine.dtype == torch.int64
    if s["restrict"]:   # every fine code lies in its coarse cluster
        assert torch.equal(model.cluster_of[subtokens_to_codes(fine, 4)], coarse)
    else:
        assert not torch.equal(model.cluster_of[subtokens_to_codes(fine, 4)], coarse)


def test_stage_modules_equal_the_plain_forward(model):
    state = {k: v.float() for k, v in model.module.state_dict().items()}
    coarse, labels = torch.randint(0, 8, (2, 16)), torch.tensor([1, 5])
    h = torch.cat([state["stage2.cls_embedding.embedding_table.weight"][labels][:, None],
                   state["stage2.tok_embedder.weight"][coarse]], 1)
    want = plain_stack(state, "stage2.", h, CONFIG["stage2"], causal=False)[:, 1:] @ state["stage2.output.1.weight"].T
    torch.testing.assert_close(model.module.stage2(coarse, labels)[:, :, 1], want, rtol=1e-5, atol=1e-5)
    h = torch.cat([state["stage1.cls_embedding.embedding_table.weight"][labels][:, None],
                   state["stage1.tok_embedder.weight"][coarse[:, :-1]]], 1)
    want = plain_stack(state, "stage1.", h, CONFIG["stage1"], causal=True) @ state["stage1.output.weight"].T
    torch.testing.assert_close(model.module.stage1(coarse[:, :-1, None], labels), want, rtol=1e-5, atol=1e-5)


# Generators, defaults and errors ------------------------------------------------------------------------
def test_image_i_depends_on_generator_i_alone(model):
    labels, cfgs, temps = [0, 3, 4], ([2.0, 3.0, 1.0], 2.5), (1.1, [1.0, 0.8, 1.2])
    state = torch.get_rng_state()
    batch = model.sample(3, labels=labels, cfg=cfgs, temperature=temps, top_k=(6, None), top_p=0.95,
                         generator=[torch.Generator().manual_seed(s) for s in (11, 12, 13)])
    assert torch.equal(torch.get_rng_state(), state)            # the global RNG is not read
    for i, seed in enumerate((11, 12, 13)):
        solo = model.sample(1, labels=[labels[i]], cfg=(cfgs[0][i], cfgs[1]), temperature=(temps[0], temps[1][i]),
                            top_k=(6, None), top_p=0.95, generator=[torch.Generator().manual_seed(seed)])
        assert torch.equal(batch[0][i:i + 1], solo[0]) and torch.equal(batch[1][i:i + 1], solo[1]), i
    torch.manual_seed(3)
    a = model.sample_tokens(2, labels=[1, 2])                   # paper defaults, global RNG
    torch.manual_seed(3)
    assert torch.equal(a, model.sample_tokens(2, labels=[1, 2], cfg=2.0, temperature=1.1))
    assert model.sample_tokens(2, labels=None, generator=torch.Generator().manual_seed(1)).shape == (2, 16, 2)


@pytest.mark.parametrize("call,match", [
    (lambda m: m.sample_tokens(2, labels=[0, 5]), "label 5 is out of range"),
    (lambda m: m.sample_tokens(2, labels=[0]), "expected 2 labels"),
    (lambda m: m.sample_tokens(1, labels=[0], cfg=(1.0, 2.0, 3.0)), "tuple \\(stage 1, stage 2\\)"),
    (lambda m: m.sample_tokens(1, labels=[0], temperature=(1.0, 0)), "temperature \\(stage 2\\) must be a finite number > 0"),
    (lambda m: m.sample_tokens(1, labels=[0], cfg=float("nan")), "cfg must be a finite number"),
    (lambda m: m.sample_tokens(1, labels=[0], top_k=(0, None)), "top_k \\(stage 1\\) must be at least 1"),
    (lambda m: m.sample_tokens(1, labels=[0], cfg_schedule="foo"), "unknown cfg_schedule"),
    (lambda m: m.sample_tokens(2, labels=[0, 1], cfg=[1.0, 2.0, 3.0]), "3 entries for 2 images"),
    (lambda m: m.sample_tokens(1, labels=[0], restrict="yes"), "restrict"),
    (lambda m: engine.generate(m, [1]), "bae=engine.load_bae"),
    (lambda m: engine.generate(m, [1], bae=engine.load_bae(DATA_BAE), num_iter=8), "num_iter must be 16"),
])
def test_sampling_errors_are_clear(model, call, match):
    with pytest.raises(SamplingError, match=match):
        call(model)


# The cluster map ---------------------------------------------------------------------------------------
def test_kmeans_cluster_map_is_deterministic_canonical_and_right():
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(6, 4, generator=gen) * 10
    truth = torch.randint(0, 6, (300,), generator=gen)
    truth[:6] = torch.tensor([5, 4, 3, 2, 1, 0])      # every blob used
    points = centres[truth] + 0.1 * torch.randn(300, 4, generator=gen)
    a, b = kmeans_cluster_map(points, 6, seed=0), kmeans_cluster_map(points, 6, seed=0)
    assert a.dtype == torch.int64 and torch.equal(a, b)
    assert torch.equal(a, kmeans_cluster_map(points, 6, seed=1))           # the same partition, the same labels
    firsts = [int((a == k).nonzero()[0]) for k in range(6)]
    assert firsts == sorted(firsts) and a[0] == 0                          # labelled by first appearance
    assert torch.equal(a, torch.tensor([5, 4, 3, 2, 1, 0])[truth])         # the blobs, canonically labelled
    # Every point lies nearest to its own cluster's mean (a k-means fixed point).
    means = torch.stack([points[a == k].mean(0) for k in range(6)])
    assert torch.equal(torch.cdist(points, means).argmin(1), a)


def test_bae_codewords_are_the_bae_latents_of_each_code():
    bae = engine.load_bae(DATA_BAE)                      # 8 bits: token_each 2 x code_dim 4
    words = bae_codewords(bae.quantize.embed.weight, 2, 4)
    codes = torch.arange(256)
    sub = torch.stack([codes >> 4, codes & 15], -1)[:, None, :]            # [256, 1 position, 2]
    bits = bae.indices_to_bits(sub)[:, :, 0, 0]                            # [256, 8]
    torch.testing.assert_close(words, bits @ bae.quantize.embed.weight)
    assert torch.equal(subtokens_to_codes(sub[:, 0], 4), codes)
    with pytest.raises(ValueError, match="token_each \\* code_dim"):
        bae_codewords(bae.quantize.embed.weight, 2, 5)


# The engine-ctf directory ---------------------------------------------------------------------------
def test_save_load_round_trip_and_generate(tmp_path, model):
    model.sampling_defaults = {"cfg": (3.0, 1.5), "top_k": (5, None)}
    try:
        save_ctf(model, tmp_path / "ctf")
    finally:
        model.sampling_defaults = {}
    meta = json.loads((tmp_path / "ctf" / "config.json").read_text())
    assert meta["format"] == "engine-ctf" and meta["family"] == "ctf" and meta["config"]["stage2"]["rope_base"] == 500.0
    assert meta["sampling"]["cfg"] == [3.0, 1.5] and meta["sampling"]["temperature"] == 1.1
    assert meta["sampling"]["top_k"] == [5, None] and meta["sampling"]["num_iter"] == 16
    state = load_file(str(tmp_path / "ctf" / "model.safetensors"))
    assert state["cluster_of"].dtype == torch.int64 and {k.split(".")[0] for k in state} == {"stage1", "stage2", "cluster_of"}
    again = engine.load(tmp_path / "ctf")
    assert isinstance(again, CTFModel) and again.config == model.config
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value) and again.state_dict()[key].dtype == value.dtype, key
    gens = lambda: [torch.Generator().manual_seed(s) for s in (1, 2)]  # noqa: E731
    assert torch.equal(again.sample_tokens(2, labels=[1, 2], generator=gens()),
                       model.sample_tokens(2, labels=[1, 2], generator=gens()))
    bae = engine.load_bae(DATA_BAE)
    images = engine.generate(again, [1, 2], bae=bae, generator=gens(), output_type="np")   # recorded defaults
    tokens = model.sample_tokens(2, labels=[1, 2], cfg=(3.0, 1.5), top_k=(5, None), generator=gens())
    np.testing.assert_allclose(images, bae.decode_indices(tokens).clamp(0, 1).permute(0, 2, 3, 1).numpy())


def _corrupt(tmp_path, model, name, edit_state=None, edit_meta=None):
    out = save_ctf(model, tmp_path / name)
    if edit_state:
        state = load_file(str(out / "model.safetensors"))
        edit_state(state)
        save_file(state, str(out / "model.safetensors"))
    if edit_meta:
        meta = json.loads((out / "config.json").read_text())
        edit_meta(meta)
        (out / "config.json").write_text(json.dumps(meta))
    return out


def _set(key, value):
    return lambda state: state.__setitem__(key, value)


@pytest.mark.parametrize("name,edit_state,edit_meta,error,match", [
    ("range", lambda s: s["cluster_of"].__setitem__(3, 8), None, CheckpointError, "cluster_of holds the label 8"),
    ("negative", lambda s: s["cluster_of"].__setitem__(0, -1), None, CheckpointError, "cluster_of holds the label -1"),
    ("empty", lambda s: s["cluster_of"].masked_fill_(s["cluster_of"] == 7, 0), None, CheckpointError,
     "clusters empty \\(e.g. cluster 7\\)"),
    ("float", lambda s: s.__setitem__("cluster_of", s["cluster_of"].float()), None, CheckpointError,
     "'cluster_of' has dtype float32; it must be an integer tensor"),
    ("length", lambda s: s.__setitem__("cluster_of", s["cluster_of"][:200].clone()), None, CheckpointError,
     "cluster_of has shape \\[200\\]"),
    ("missing", lambda s: s.pop("stage2.norm.weight"), None, CheckpointError, "missing keys.*stage2.norm.weight"),
    ("nan", lambda s: s["stage1.norm.weight"].__setitem__(0, float("nan")), None, CheckpointError,
     "stage1.norm.weight"),
    ("stage", None, lambda m: m["config"]["stage1"].update(n_head=3), ConfigError, "stage1.*not divisible"),
    ("unknown", None, lambda m: m["config"]["stage2"].update(bogus=1), ConfigError, "stage2.*bogus"),
    ("clusters", None, lambda m: m["config"].update(num_clusters=300), ConfigError, "exceeds the codebook size"),
    ("format", None, lambda m: m.update(format="engine-xyz"), CheckpointError, "not an engine model config"),
])
def test_bad_checkpoints_are_refused_by_name(tmp_path, model, name, edit_state, edit_meta, error, match):
    out = _corrupt(tmp_path, model, name, edit_state, edit_meta)
    with pytest.raises(error, match=match):
        engine.load(out)


def test_config_limits_and_bare_state_dicts(tmp_path, model):
    for values, match in [(dict(code_dim=13, token_each=2), "exceeds the engine's limit 24"),
                          (dict(num_clusters=0), "num_clusters must be an integer >= 1"),
                          (dict(block_size=15), "must be a square"),
                          (dict(stage1=dict(dim=40, n_head=4)), "stage1.*multiple of 4"),
                          (dict(stage2="big"), "stage2 must be a dict")]:
        with pytest.raises(ConfigError, match=match):
            CTFConfig.from_dict({**CONFIG, **values})
    torch.save(model.state_dict(), tmp_path / "bare.pth")
    with pytest.raises(CheckpointError, match="load from engine directories"):
        engine.load(tmp_path / "bare.pth")


# The graph-safe steps ---------------------------------------------------------------------------------
def test_decode_step_and_refine_compile_fullgraph_without_host_syncs(model):
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    m, gen = model.module, torch.Generator().manual_seed(0)
    rows = torch.tensor([1, 2, 5, 5])                      # [cond; null] for two images
    scale, temperature = torch.tensor([2.0, 3.5]), torch.tensor([1.1, 0.9])
    caches = [m.stage1.new_cache(4), m.stage1.new_cache(4)]
    for cache in caches:
        m.stage1.prefill(rows, None, cache)
    counter = CompileCounter()
    step = torch.compile(model.decode_step, fullgraph=True, backend=counter, dynamic=False)
    prev = torch.tensor([[3], [6]])
    for pos in (1, 2, 3):
        noise = torch.empty(2, 1, 8).exponential_(1, generator=gen)
        got = step(prev, torch.tensor([pos]), caches[0], scale, temperature, 5, 0.9, noise)
        want, counts = count_ops(model.decode_step, prev, torch.tensor([pos]), caches[1], scale, temperature, 5,
                                 0.9, noise)
        assert counts.host_syncs == 0 and not any("nonzero" in op or "item" in op for op in counts.counts)
        assert torch.equal(got[0], want[0])
        prev = got[0]
    assert counter.frame_count == 1                        # one graph for every position
    torch.testing.assert_close(caches[0].k, caches[1].k)
    coarse = torch.randint(0, 8, (2, 16), generator=gen)
    for restrict, shape in ((True, (2, 16, model.members.shape[1])), (False, (2, 32, 16))):
        refine = torch.compile(model.refine, fullgraph=True, backend=CompileCounter(), dynamic=False)
        noise = torch.empty(shape).exponential_(1, generator=gen)
        got = refine(coarse, rows, scale, temperature, 7, 0.95, noise, restrict)
        want, counts = count_ops(model.refine, coarse, rows, scale, temperature, 7, 0.95, noise, restrict)
        assert counts.host_syncs == 0
        assert torch.equal(got[0], want[0]) and want[0].shape == (2, 16, 2)


# Training ------------------------------------------------------------------------------------------------
def test_losses_on_random_codes():
    config = CTFConfig.from_dict(CONFIG)
    gen = torch.Generator().manual_seed(0)
    codes, labels = torch.randint(0, 16, (64, 16, 2), generator=gen), torch.randint(0, 5, (64,), generator=gen)
    cluster_of = make_model().cluster_of.clone()
    task = CTFTask(config, codes, labels, cluster_of)
    module = task.init_weights(task.build())
    assert torch.equal(module.cluster_of, cluster_of)
    loss, stats = ctf_losses(module, codes, labels, 0.1, gen)              # zero heads: uniform predictions
    assert stats["ce_coarse"] == pytest.approx(math.log(8), rel=1e-5)
    assert stats["ce_fine"] == pytest.approx(math.log(16), rel=1e-5)
    # Stage 1 is causal: changing the last token changes no earlier prediction's loss.
    init_ctf_weights(module)
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.1)
    with torch.no_grad():
        per = lambda c: F.cross_entropy(  # noqa: E731
            module.stage1(module.cluster_of[subtokens_to_codes(c, 4)][:, :-1, None], labels[:4]).transpose(1, 2),
            module.cluster_of[subtokens_to_codes(c, 4)], reduction="none")[:, :-1]
        other = codes[:4].clone()
        other[:, -1] = (other[:, -1] + 1) % 16
        torch.testing.assert_close(per(codes[:4]), per(other))
    module = task.init_weights(task.build())
    opt = torch.optim.AdamW(module.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        loss, stats = ctf_losses(module, codes[:16], labels[:16], 0.1, gen)
        first = first or float(loss.detach())
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None for p in module.parameters())        # both stages train
        opt.step()
    assert float(loss.detach()) < first - 0.5
    with pytest.raises(ConfigError, match="codes must be integers"):
        CTFTask(config, codes[:, :8], labels, cluster_of)


# The built-in model ------------------------------------------------------------------------------------
def test_builtin_digits_ctf_loads_with_its_bae_and_samples_consistent_digits():
    model = engine.load("digits-ctf")
    c = model.config
    assert model.family == "ctf" and model.bae is not None and model.bae.bits == c.token_each * c.code_dim
    assert model.cluster_of.dtype == torch.int64 and torch.bincount(model.cluster_of).min() > 0
    assert model.sampling_defaults["num_iter"] == c.block_size == 16
    gens = lambda: [torch.Generator().manual_seed(s) for s in (4, 5)]  # noqa: E731
    coarse, fine = model.sample(2, labels=[3, 7], generator=gens())
    assert torch.equal(model.cluster_of[subtokens_to_codes(fine, c.code_dim)], coarse)
    images = engine.generate(model, [3, 7], generator=gens(), output_type="pt")   # its own BAE
    assert images.shape == (2, 1, 16, 16) and 0 <= float(images.min()) and float(images.max()) <= 1
