"""The continuous causal AR family ("causal") and the built-in "digits-causal": the KV-cached decode
against a plain-torch causal recompute, the sampler against a plain re-statement that runs the
cond and null passes apart, per-image generators, every CPU head backend, the compiled decode
step, the shipped model's quality, bad inputs, and training."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import engine
from engine.backends.reference import ReferenceBackend
from engine.core.counting import count_ops
from engine.core.errors import ConfigError, SamplingError
from engine.families.causal import CausalConfig, CausalModel
from engine.loading import BUILTIN_MODELS, save_engine_dir
from engine.models.causal import CausalAR
from engine.models.mar import patchify

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(img_size=6, vae_stride=1, patch_size=2, vae_embed_dim=1, tokenizer="pixels", embed_dim=32,
            depth=2, num_heads=2, mlp_ratio=2.0, class_num=5, diffloss_d=2, diffloss_w=32,
            num_sampling_steps="5", clip_denoised=True, clip_range=(-1.0, 1.0))
SHUFFLED = (4, 0, 8, 2, 6, 1, 7, 3, 5)   # a non-raster order of the 3 x 3 grid


def random_module(seed=0, **overrides) -> CausalAR:
    torch.manual_seed(seed)
    module = CausalAR(CausalConfig.from_dict({**TINY, **overrides}))
    with torch.no_grad():
        for p in module.parameters():    # every weight non-zero (the head's adaLN included)
            p.copy_(torch.randn_like(p) * 0.3)
    return module


@pytest.fixture(scope="module")
def tiny():
    return CausalModel(random_module(), backend="reference")


def gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


# A plain-torch re-statement of the model (written from the architecture, not the module) -------
def restated_z(state, config, start, fed, order):
    """z [B, S, D] for start rows [B, D] and the tokens fed so far `fed [B, S-1, C]`."""
    d, heads = config.embed_dim, config.num_heads
    hd = d // heads
    b, s = start.shape[0], fed.shape[1] + 1
    held = [0] + [o + 1 for o in order[:s - 1]]
    pos = state["pos_embed_learned"][0, held] + state["target_pos_embed_learned"][0, list(order[:s])]
    x = torch.cat([start[:, None], fed @ state["z_proj.weight"].T + state["z_proj.bias"]], 1) + pos

    def ln(t, name):
        return F.layer_norm(t, (d,), state[f"{name}.weight"], state[f"{name}.bias"], 1e-6)

    x = ln(x, "z_proj_ln")
    causal = torch.ones(s, s).triu(1).bool()
    for i in range(config.depth):
        p = f"blocks.{i}."
        qkv = ln(x, p + "norm1") @ state[p + "attn.qkv.weight"].T + state[p + "attn.qkv.bias"]
        q, k, v = (t.reshape(b, s, heads, hd).transpose(1, 2) for t in qkv.split(d, dim=-1))
        scores = (q @ k.transpose(-1, -2) / math.sqrt(hd)).masked_fill(causal, float("-inf"))
        o = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, d)
        x = x + o @ state[p + "attn.proj.weight"].T + state[p + "attn.proj.bias"]
        h = ln(x, p + "norm2") @ state[p + "mlp.fc1.weight"].T + state[p + "mlp.fc1.bias"]
        x = x + F.gelu(h) @ state[p + "mlp.fc2.weight"].T + state[p + "mlp.fc2.bias"]
    return ln(x, "norm")


def f32_linear_scale(cfg, s, length):
    """1 + (cfg - 1) * (s + 1) / L in float32 operations (MAR's linear schedule, t = s + 1)."""
    f = np.float32
    return float(f(1) + f(f(f(cfg - 1) * f(s + 1)) / f(length)))


def restated_sample(model, label, cfg, order, generator, temperature, schedule="linear"):
    """One image [1, L, C] (position order): every step recomputes the whole prefix, the cond and
    null passes run apart, the head runs the reference loop on [cond; null]."""
    c, head = model.config, model.head
    state = model.mar.state_dict()
    length, dim = c.seq_len, c.token_dim
    cond, null = state["class_emb.weight"][label][None], state["fake_latent"]
    fed, out = torch.zeros(1, 0, dim), torch.zeros(1, length, dim)
    for s in range(length):
        z = torch.cat([restated_z(state, c, cond, fed, order)[:, -1], restated_z(state, c, null, fed, order)[:, -1]])
        scale = f32_linear_scale(cfg, s, length) if schedule == "linear" else cfg
        x = torch.randn((1, dim), generator=generator)
        noise = torch.stack([torch.randn((2, dim), generator=generator) for _ in range(head.num_steps)])
        token = ReferenceBackend().head_loop(head, z, x, noise, scale, temperature)
        out[:, order[s]] = token
        fed = torch.cat([fed, token[:, None]], dim=1)
    return out


# The transformer ---------------------------------------------------------------------------------
@pytest.mark.parametrize("order", [tuple(range(9)), SHUFFLED], ids=["raster", "shuffled"])
def test_kv_cached_decode_equals_a_full_causal_recompute(tiny, order):
    m, c = tiny.mar, tiny.config
    state = m.state_dict()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randn(3, c.seq_len, c.token_dim, generator=g)
    start = m.class_embedding(torch.tensor([0, 3, 4]), 3, False)
    order_t = torch.tensor(order)
    seq_pos = m.position_table(order_t)
    cache = m.new_cache(3)
    fed = tokens[:, list(order)]                                   # tokens in generation order
    want = restated_z(state, c, start, fed[:, :-1], order)          # [3, L, D]
    got = [m.prefill(start, seq_pos, cache)]
    for s in range(1, c.seq_len):
        got.append(m.decode(fed[:, s - 1], torch.tensor([s]), cache, seq_pos))
    torch.testing.assert_close(torch.stack(got, 1), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m(start, tokens, order_t), want, rtol=1e-5, atol=1e-5)   # teacher forcing


def test_parameter_count_and_config_round_trip(tmp_path, tiny):
    c = tiny.config
    assert c.estimate_params() == sum(p.numel() for p in tiny.mar.parameters())
    config = CausalConfig.from_dict({**TINY, "order": list(SHUFFLED)})
    out = save_engine_dir(random_module(order=list(SHUFFLED)).state_dict(), config, tmp_path / "m", {"sampling": {"cfg": 2.0}})
    model = engine.load(out, backend="reference")
    assert model.family == "causal" and model.config.order == SHUFFLED and model.sampling_defaults == {"cfg": 2.0}
    assert json.loads((out / "config.json").read_text())["config"]["order"] == list(SHUFFLED)
    base = CausalConfig.from_preset("causal_base")
    assert (base.embed_dim, base.depth, base.num_heads) == (768, 24, 12)


# The sampler -------------------------------------------------------------------------------------
@pytest.mark.parametrize("order,cfg,schedule", [(None, 3.0, "linear"), (SHUFFLED, 2.5, "constant")],
                         ids=["raster-linear", "shuffled-constant"])
def test_sampler_equals_separate_cond_and_null_recomputes(tiny, order, cfg, schedule):
    want = restated_sample(tiny, 2, cfg, order or tuple(range(9)), gens(7)[0], 0.9, schedule)
    got = tiny.sample_tokens(1, cfg=cfg, cfg_schedule=schedule, labels=[2], temperature=0.9, generator=gens(7),
                             order=order)
    assert got.shape == (1, 1, 6, 6)
    torch.testing.assert_close(patchify(got, 2), want, rtol=1e-5, atol=1e-5)


def test_image_i_of_a_batch_equals_a_solo_run_with_generator_i(tiny):
    labels, cfgs, temps, seeds = [1, 4, 0], [1.0, 3.0, 2.0], [1.0, 0.9, 1.1], (11, 12, 13)
    batch = tiny.sample_tokens(3, cfg=cfgs, labels=labels, temperature=temps, generator=gens(*seeds))
    for i in range(3):
        solo = tiny.sample_tokens(1, cfg=cfgs[i], labels=[labels[i]], temperature=temps[i], generator=gens(seeds[i]))
        torch.testing.assert_close(batch[i:i + 1], solo, rtol=1e-5, atol=1e-5)
    again = tiny.sample_tokens(3, cfg=cfgs, labels=labels, temperature=temps, generator=gens(*seeds))
    assert torch.equal(batch, again)                       # the reused static cache leaks nothing
    assert not torch.equal(batch[1], tiny.sample_tokens(1, cfg=3.0, labels=[4], temperature=0.9,
                                                        generator=gens(99))[0])


def test_every_cpu_backend_gives_the_reference_tokens(rel_err):
    from engine.backends import available_backends

    module = random_module(seed=3, img_size=4, num_sampling_steps="3")      # 4 tokens, 3 diffusion steps
    names = available_backends("cpu", include_interpreted=True)
    assert "native" in names and "triton" in names       # native builds here; Triton in its interpreter
    want = CausalModel(module, backend="reference").sample_tokens(2, cfg=[2.0, 1.5], labels=[1, 3],
                                                                  generator=gens(0, 1))
    for name in names:
        got = CausalModel(module, backend=name).sample_tokens(2, cfg=[2.0, 1.5], labels=[1, 3], generator=gens(0, 1))
        assert rel_err(got, want) <= 1e-4, (name, rel_err(got, want))


def test_bf16_precision_stays_close_to_float32(tiny, rel_err):
    """The transformer under bf16 autocast with a bf16 static cache; the head backends' bf16."""
    want = tiny.sample_tokens(2, cfg=2.0, labels=[1, 2], generator=gens(0, 1))
    for name in ("reference", "native"):
        model = CausalModel(tiny.mar, backend=name, precision="bf16")
        got = model.sample_tokens(2, cfg=2.0, labels=[1, 2], generator=gens(0, 1))
        assert model._cache.k.dtype == torch.bfloat16
        assert 0 < rel_err(got, want) < 5e-2, (name, rel_err(got, want))


def test_decode_step_compiles_fullgraph_without_host_syncs(tiny):
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    m, c = tiny.mar, tiny.config
    seq_pos = m.position_table(torch.tensor(SHUFFLED))
    start = m.class_embedding(torch.tensor([1, 2]), 2, True)             # [cond; null] of two images
    cache, eager_cache = m.new_cache(4), m.new_cache(4)
    m.prefill(start, seq_pos, cache)
    m.prefill(start, seq_pos, eager_cache)
    counter = CompileCounter()
    compiled = torch.compile(tiny.decode_step, fullgraph=True, backend=counter, dynamic=False)
    g = torch.Generator().manual_seed(0)
    for pos in (1, 2, 3):
        prev, input_pos = torch.randn(2, c.token_dim, generator=g), torch.tensor([pos])
        got = compiled(prev, input_pos, cache, seq_pos, True)
        want, counts = count_ops(tiny.decode_step, prev, input_pos, eager_cache, seq_pos, True)
        assert counts.host_syncs == 0
        assert got.shape == (4, c.embed_dim)
        torch.testing.assert_close(got, want)
    assert counter.frame_count == 1      # one graph for every position: input_pos is a tensor
    torch.testing.assert_close(cache.k, eager_cache.k)


def test_bad_inputs_raise_engine_errors(tiny):
    with pytest.raises(SamplingError, match="label 5 is out of range"):
        tiny.sample_tokens(1, labels=[5])
    with pytest.raises(SamplingError, match="permutation"):
        tiny.sample_tokens(1, labels=[0], order=[0, 1, 2, 3, 4, 5, 6, 7, 7])
    with pytest.raises(SamplingError, match="permutation"):
        tiny.sample_tokens(1, labels=[0], order=[0, 1])
    with pytest.raises(SamplingError, match="order"):
        tiny.sample_tokens(1, labels=[0], order=[0.5] * 9)
    for cfg in (float("nan"), float("inf")):
        with pytest.raises(SamplingError, match="cfg"):
            tiny.sample_tokens(1, labels=[0], cfg=cfg)
    with pytest.raises(SamplingError, match="overflows float32"):
        tiny.sample_tokens(1, labels=[0], cfg=3e38)
    with pytest.raises(SamplingError, match="num_iter"):
        tiny.sample_tokens(1, labels=[0], num_iter=4)
    with pytest.raises(SamplingError, match="temperature"):
        tiny.sample_tokens(1, labels=[0], temperature=0.0)
    with pytest.raises(SamplingError, match="generators"):
        tiny.sample_tokens(2, labels=[0, 1], generator=gens(1))
    with pytest.raises(ConfigError, match="permutation"):
        CausalConfig.from_dict({**TINY, "order": [0] * 9})
    with pytest.raises(ConfigError, match="num_heads"):
        CausalConfig.from_dict({**TINY, "num_heads": 3})
    with pytest.raises(ConfigError, match="depth"):
        CausalConfig.from_dict({**TINY, "depth": 10 ** 6})
    with pytest.raises(SamplingError, match="class-conditional"):
        engine.generate(tiny, prompts=["a 3"])


# The built-in model ------------------------------------------------------------------------------
def test_builtin_model_generates_digits():
    model = engine.load("digits-causal")
    assert model.family == "causal" and model.config.seq_len == 16
    meta = json.loads((BUILTIN_MODELS["digits-causal"] / "config.json").read_text())
    assert meta["family"] == "causal" and meta["training"]["weights_dtype"] == "float16"
    assert "--family causal" in meta["training"]["command"]
    images = engine.generate(model, [0, 7, 9], output_type="np", generator=gens(0, 1, 2))
    assert images.shape == (3, 16, 16, 1)
    assert np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    assert 0.05 < images.mean() < 0.6        # light strokes on a dark background


# Measured at the shipped defaults with 5 per class at seed 0: 100% (98.8% over 100 per class,
# docs/digits-causal/quality.md); the bar is the issue's, far above an untrained model's ~10%
# (45% at cfg 1 for an EMA snapshot of a shorter run after 500 steps).
MIN_ACCURACY = 0.85


def test_shipped_model_is_classified_as_requested():
    from engine.builtin.evaluate import evaluate_samples, generate_digits, make_reference

    model = engine.load("digits-causal")
    d = model.sampling_defaults
    ref = make_reference(model.config.img_size, 5)
    images, labels = generate_digits(model, 5, d["cfg"], d["num_iter"], d["temperature"], seed=0)
    result = evaluate_samples(ref, images, labels)
    assert result["accuracy"] >= MIN_ACCURACY, result


# Training ----------------------------------------------------------------------------------------
def test_training_steps_lower_the_loss_and_the_result_loads(tmp_path):
    from engine.builtin.digits import load_split
    from engine.builtin.training import TrainConfig, TrainTables, train
    from engine.builtin.train_causal import CausalDigitsTask, causal_loss

    config = CausalConfig.from_dict({**TINY, "img_size": 8, "class_num": 10})    # digits at 8 x 8
    images, labels = load_split("train", 8)
    task = CausalDigitsTask(config, images[:64], labels[:64])
    tc = TrainConfig(steps=30, batch_size=16, diffusion_batch_mul=2, warmup_steps=5, threads=1, log_every=10)
    result = train(config, tc, task=task, log=None)
    losses = [h["loss"] for h in result["history"]]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    module = CausalAR(config)
    module.load_state_dict(result["ema"])
    loss, stats = causal_loss(module, TrainTables(), images[:4], labels[:4], torch.Generator().manual_seed(0))
    assert math.isfinite(loss.item()) and set(stats) == {"mse", "vb"}
    out = save_engine_dir(result["ema"], config, tmp_path / "trained")
    assert engine.load(out).sample_tokens(2, labels=[3, 4], cfg=2.0).shape == (2, 1, 8, 8)


def test_train_command_family_causal(tmp_path):
    from engine.cli import main

    out = tmp_path / "run"
    assert main(["train", "--family", "causal", "--out", str(out), "--seed", "0", "--steps", "2",
                 "--batch-size", "4", "--resume-every", "0", "--log-every", "1"]) == 0
    meta = json.loads((out / "config.json").read_text())
    assert meta["family"] == "causal" and meta["sampling"]["num_iter"] == 16
    assert meta["training"]["steps"] == 2 and "--family causal" in meta["training"]["command"]
    assert engine.load(out).config.depth == CausalConfig.from_preset("causal_digits").depth
    assert main(["train", "--family", "causal", "--out", str(out), "--decoder-depth", "2"]) == 2
