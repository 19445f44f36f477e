"""ELM's discrete AR family ("elm-ar"): the published generate_cfg reproduced token for token on a
static KV cache, the engine's sample_tokens idiom, the graph-safe decode step and the BAE decoder.

Goldens: tests/data/elm (recorded by make_elm_outputs.py from the published code on CPU)."""
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import engine
from engine.ops.categorical import sample_logits, top_k_mask, top_p_mask
from engine.core.counting import count_ops
from engine.core.errors import CheckpointError, ConfigError, EngineError, SamplingError
from engine.families.elm import ELMConfig, ELMModel, infer_sizes
from engine.models.elm import ELMTransformer

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = Path(__file__).resolve().parents[2] / "data" / "elm"
META = json.loads((DATA / "runs.json").read_text())
GOLD = load_file(str(DATA / "tokens.safetensors"))
RUNS = {r["name"]: r for r in META["runs"]}
# What a user passes for these small configurations: the sizes a bare state dict cannot tell.
SIZES = {"a": dict(n_head=4, block_size=16),
         "b": dict(n_head=2, n_kv_head=1, block_size=64, norm_eps=1e-6, rope_base=500.0),
         "c": dict(n_head=2, block_size=16, cls_token_num=2)}


@pytest.fixture(scope="module")
def models():
    return {name: engine.load(DATA / f"ck_{name}.pth", family="elm-ar", **sizes) for name, sizes in SIZES.items()}


def call_generate_cfg(model, run):
    prefix = GOLD[run["prefix"]] if run["prefix"] else None
    torch.manual_seed(run["seed"])
    out = model.generate_cfg(prefix, torch.tensor(run["cond"]), run["num_iter"], temperature=run["temperature"],
                             top_k=run["top_k"], remask=run["remask"], cfg_scale=run["cfg_scale"],
                             cfg_schedule=run["cfg_schedule"], scale_pow=run["scale_pow"])
    return out, torch.rand(4)


def check_run(model, name):
    run = RUNS[name]
    (tokens, logits), after = call_generate_cfg(model, run)
    want = GOLD[f"{name}.tokens"]
    assert tokens.dtype == torch.int64 and tokens.shape == want.shape
    assert torch.equal(tokens, want), f"{name}: {(tokens != want).sum()} sub-tokens differ"
    assert torch.equal(after, GOLD[f"{name}.after"]), "the global RNG was not left as the published code leaves it"
    gold_logits = GOLD[f"{name}.logits"]
    assert torch.equal(torch.isinf(logits), torch.isinf(gold_logits))      # the same top-k sets
    finite = torch.isfinite(gold_logits)
    torch.testing.assert_close(logits[finite], gold_logits[finite], rtol=1e-4, atol=1e-4)


def test_goldens_cover_the_brief():
    runs = META["runs"]
    assert {r["cfg_schedule"] for r in runs} == {"linear", "constant", "cos", "log", "square", "square_root"}
    assert {r["top_k"] is None for r in runs} == {True, False}
    assert any(r["cfg_scale"] == 1.0 for r in runs) and any(r["temperature"] != 1.0 for r in runs)
    assert any(r["scale_pow"] != 1.0 for r in runs) and any(r["prefix"] for r in runs)


@pytest.mark.parametrize("name", sorted(RUNS))
def test_generate_cfg_reproduces_the_published_tokens(models, name):
    check_run(models[RUNS[name]["config"]], name)


@dataclass
class ModelArgs:
    """The published ModelArgs' fields and defaults (llama/ar_model.py), for a stand-in instance."""
    use_adaLN: bool = False
    attn_type: str = "sdp"
    pause: bool = False
    pause_num: int = 0
    token_each: int = 4
    split_embder: bool = False
    cls_row: bool = False
    pos_type: str = "rope2d"
    code_dim: int = 16
    dim: int = 4096
    n_layer: int = 32
    n_head: int = 32
    n_kv_head: Optional[int] = None
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    rope_base: float = 10000
    norm_eps: float = 1e-5
    initializer_range: float = 0.02
    token_dropout_p: float = 0.1
    attn_dropout_p: float = 0.0
    resid_dropout_p: float = 0.1
    ffn_dropout_p: float = 0.1
    drop_path_rate: float = 0.0
    num_classes: int = 1000
    caption_dim: int = 2048
    class_dropout_prob: float = 0.1
    model_type: str = "c2i"
    vocab_size: int = 256
    cls_token_num: int = 1
    block_size: int = 256
    max_batch_size: int = 32
    max_seq_len: int = 2048


def published_standin(name):
    """An object with the attributes, `config` and state dict of a published Transformer."""
    values = META["configs"][name]
    module = ELMTransformer(ELMConfig.from_dict(values))    # the published SwiGLU-width formula
    module.load_state_dict(torch.load(DATA / f"ck_{name}.pth", weights_only=True))
    obj = torch.nn.Module()
    for child in ("cls_embedding", "tok_embedder", "proj", "layers", "norm", "output"):
        if hasattr(module, child):
            obj.add_module(child, getattr(module, child))
    obj.config = ModelArgs(**values)
    obj.generate_cfg = lambda *a, **k: "published generate_cfg"
    return obj


@pytest.mark.parametrize("name", ["a_linear", "b_prefix", "c_const"])
def test_accelerate_a_published_instance(name):
    standin = published_standin(RUNS[name]["config"])
    model = engine.accelerate(standin)
    assert isinstance(model, ELMModel) and model.config.dim == standin.config.dim
    check_run(model, name)
    patched = engine.patch(published_standin(RUNS[name]["config"]))
    check_run(patched, name)   # generate_cfg replaced in place
    assert patched.engine_model.family == "elm-ar"


@pytest.mark.parametrize("name", ["a", "b", "c"])
def test_module_forward_and_kv_decode_equal_the_published_forward(models, name):
    model = models[name]
    m, c = model.module, model.config
    idx, cond = GOLD[f"forward.{name}.idx"], GOLD[f"forward.{name}.cond"]
    published = GOLD[f"forward.{name}"].reshape(2, -1, c.token_each, c.vocab_size)
    full = m(idx, cond).reshape(2, -1, c.token_each, c.vocab_size)
    torch.testing.assert_close(full, published, rtol=1e-5, atol=1e-5)
    # Prefill of the class position + 2 tokens, then one-token decode steps against the cache.
    cache = m.new_cache(2)
    torch.testing.assert_close(m.prefill(cond, idx[:, :2], cache), published[:, 2], rtol=1e-5, atol=1e-5)
    pos = torch.tensor([3])
    for j in range(2, idx.shape[1]):
        torch.testing.assert_close(m.decode(idx[:, j], pos, cache), published[:, j + 1], rtol=1e-5, atol=1e-5)
        pos += 1


def test_sample_tokens_without_generator_is_generate_cfg(models):
    model, run = models["a"], RUNS["a_linear"]
    torch.manual_seed(run["seed"])
    tokens = model.sample_tokens(2, labels=run["cond"], cfg=run["cfg_scale"], cfg_schedule="linear",
                                 top_k=run["top_k"])
    assert torch.equal(tokens, GOLD["a_linear.tokens"])


def test_generators_one_per_image_equal_solo_runs(models):
    model = models["b"]
    labels, cfgs, temps, schedules = [0, 3, 4], [2.0, 3.0, 1.5], [1.0, 0.8, 1.2], ["linear", "constant", "cos"]
    gens = [torch.Generator().manual_seed(s) for s in (11, 12, 13)]
    state = torch.get_rng_state()
    batch = model.sample_tokens(3, labels=labels, cfg=cfgs, cfg_schedule=schedules, temperature=temps,
                                top_k=8, top_p=0.95, generator=gens)
    assert torch.equal(torch.get_rng_state(), state)      # no global RNG read
    assert batch.shape == (3, 64, 2)
    for i, seed in enumerate((11, 12, 13)):
        solo = model.sample_tokens(1, labels=[labels[i]], cfg=cfgs[i], cfg_schedule=schedules[i],
                                   temperature=temps[i], top_k=8, top_p=0.95,
                                   generator=[torch.Generator().manual_seed(seed)])
        assert torch.equal(batch[i:i + 1], solo), i
    one = model.sample_tokens(3, labels=labels, cfg=2.0, generator=torch.Generator().manual_seed(5))
    again = model.sample_tokens(3, labels=labels, cfg=2.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(one, again) and not torch.equal(one, batch)
    uncond = model.sample_tokens(2, labels=None, generator=torch.Generator().manual_seed(5))
    assert uncond.shape == (2, 64, 2) and int(uncond.max()) < 32


def test_decode_step_compiles_fullgraph_without_host_syncs(models):
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = models["b"]
    c, m = model.config, model.module
    labels = torch.tensor([1, 2, 5, 5])          # [cond; null] for two images
    cache = m.new_cache(4)
    m.prefill(labels, None, cache)
    prev = torch.tensor([[3, 7], [1, 2]])
    scale = torch.tensor([2.0, 3.5])
    temperature = torch.tensor([1.0, 0.9])
    counter = CompileCounter()
    compiled = torch.compile(model.decode_step, fullgraph=True, backend=counter, dynamic=False)
    gen = torch.Generator().manual_seed(0)
    eager_cache = m.new_cache(4)
    m.prefill(labels, None, eager_cache)
    for pos in (1, 2, 3):
        noise = torch.empty(2, c.token_each, c.vocab_size).exponential_(1, generator=gen)
        input_pos = torch.tensor([pos])
        got = compiled(prev, input_pos, cache, scale, temperature, 5, 0.9, noise)
        want, counts = count_ops(model.decode_step, prev, input_pos, eager_cache, scale, temperature, 5, 0.9, noise)
        assert counts.host_syncs == 0
        assert not any("nonzero" in op or "multinomial" in op or "item" in op for op in counts.counts)
        assert torch.equal(got[0], want[0])
        torch.testing.assert_close(got[1], want[1])
        prev = got[0]
    assert counter.frame_count == 1      # one graph for every position: input_pos is a tensor
    torch.testing.assert_close(cache.k, eager_cache.k)


def test_sampling_step_pieces():
    logits = torch.tensor([[[1.0, 3.0, 3.0, 2.0, -1.0]]])
    assert torch.isinf(top_k_mask(logits, 2)).tolist() == [[[True, False, False, True, True]]]
    assert torch.isinf(top_k_mask(logits, 1)).sum() == 3          # ties at the k-th value are kept
    assert not torch.isinf(top_k_mask(logits, 99)).any()
    kept = ~torch.isinf(top_p_mask(torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])), 0.75))
    assert kept.tolist() == [[True, True, False, False]]
    noise = torch.ones(1, 1, 5)
    idx, filtered, probs = sample_logits(torch.cat([logits, logits - 1]), noise, torch.tensor(2.0), 1.0, 2)
    assert idx.tolist() == [[1]] and torch.isinf(filtered).sum() == 3


def test_bae_decoder_matches_the_published_decode(tmp_path):
    gold = load_file(str(DATA / "bae.safetensors"))
    bae = engine.load_bae(DATA / "binaryae_ema.th")
    assert bae.bits == 8 and bae.upsamplings == 1
    for k in range(2):
        torch.testing.assert_close(bae.decode_indices(gold[f"{k}.indices"]), gold[f"{k}.images"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bae.decode_indices(GOLD["a_linear.tokens"]), gold["run_a_linear.images"],
                               rtol=1e-5, atol=1e-5)
    bare = {k.split(".", 1)[1]: v for k, v in torch.load(DATA / "binaryae_ema.th", weights_only=True).items()
            if k.startswith("ae.")}
    torch.save(bare, tmp_path / "bare.th")              # a BinaryAutoEncoder state dict without the prefix
    torch.testing.assert_close(engine.load_bae(tmp_path / "bare.th").decode_indices(gold["0.indices"]),
                               gold["0.images"], rtol=1e-5, atol=1e-5)


def test_generate_decodes_elm_tokens(models):
    model, bae = models["a"], engine.load_bae(DATA / "binaryae_ema.th")
    gens = lambda: [torch.Generator().manual_seed(s) for s in (1, 2)]  # noqa: E731
    images = engine.generate(model, [3, 4], bae=bae, cfg=2.0, top_k=6, generator=gens(), output_type="np")
    assert images.shape == (2, 8, 8, 3) and images.min() >= 0 and images.max() <= 1
    tokens = model.sample_tokens(2, labels=[3, 4], cfg=2.0, top_k=6, generator=gens())
    want = bae.decode_indices(tokens).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(images, want)
    pil = engine.generate(model, num_images=1, bae=bae, output_type="pil")
    assert pil[0].size == (8, 8)


def test_family_recognition_and_presets(tmp_path, models):
    auto = engine.load(DATA / "ck_a.pth", n_head=4, block_size=16)       # recognised from its keys
    assert auto.family == "elm-ar" and auto.config.num_classes == 10 and auto.config.token_each == 2
    with torch.device("meta"):
        big = ELMTransformer(ELMConfig.from_preset("GPT-L", token_each=2, code_dim=10))
    sizes = infer_sizes(big.state_dict())
    assert sizes == dict(num_classes=1000, dim=1024, token_each=2, code_dim=10, n_layer=24,
                         ffn_hidden_dim=2816, n_head=16)
    assert ELMConfig.from_preset("GPT-2B").n_head == 28
    engine.convert(DATA / "ck_c.pth", tmp_path / "c", family="elm-ar", **SIZES["c"])   # engine format
    again = engine.load(tmp_path / "c")
    check_run(again, "c_const")


@pytest.mark.parametrize("call,error,match", [
    (lambda m: m.sample_tokens(2, labels=[0, 10]), SamplingError, "label 10 is out of range"),
    (lambda m: m.sample_tokens(2, labels=[0.5, 1]), SamplingError, "integers"),
    (lambda m: m.sample_tokens(2, labels=[1]), SamplingError, "expected 2 labels"),
    (lambda m: m.sample_tokens(1, top_k=0), SamplingError, "top_k must be at least 1"),
    (lambda m: m.sample_tokens(1, top_k=2.5), SamplingError, "top_k must be a positive integer"),
    (lambda m: m.sample_tokens(1, top_p=0.0), SamplingError, "top_p"),
    (lambda m: m.sample_tokens(1, temperature=0), SamplingError, "temperature must be a finite number > 0"),
    (lambda m: m.sample_tokens(1, temperature=float("nan")), SamplingError, "temperature"),
    (lambda m: m.sample_tokens(1, cfg=float("inf")), SamplingError, "cfg must be a finite number"),
    (lambda m: m.sample_tokens(1, cfg="3"), SamplingError, "cfg must be a finite number"),
    (lambda m: m.sample_tokens(1, cfg=2.0, cfg_schedule="foo"), SamplingError, "unknown cfg_schedule"),
    (lambda m: m.sample_tokens(1, num_iter=18), SamplingError, "exceeds the 17 positions"),
    (lambda m: m.sample_tokens(0), SamplingError, "bsz must be at least 1"),
    (lambda m: m.sample_tokens(2, generator=[torch.Generator()]), SamplingError, "1 generators for 2 images"),
    (lambda m: m.generate_cfg(None, None, 4), SamplingError, "needs cond"),
    (lambda m: m.generate_cfg(None, torch.tensor([1]), 4, cfg_schedule="foo"), SamplingError, "unknown cfg_schedule"),
    (lambda m: m.generate_cfg(None, torch.tensor([1]), 4, top_k=0), SamplingError, "top_k"),
    (lambda m: m.generate_cfg(torch.zeros(1, 3, 1, dtype=torch.long), torch.tensor([1]), 4), SamplingError,
     r"idx must have shape \[1, P, 2\]"),
    (lambda m: m.generate_cfg(torch.full((1, 3, 2), 16), torch.tensor([1]), 4), SamplingError, "outside 0..15"),
    (lambda m: engine.generate(m, [1]), SamplingError, "bae=engine.load_bae"),
    (lambda m: engine.generate(m, [1], bae=engine.load_bae(DATA / "binaryae_ema.th"), num_iter=8),
     SamplingError, "num_iter must be 16"),
])
def test_sampling_errors_are_clear(models, call, error, match):
    with pytest.raises(error, match=match):
        call(models["a"])


def test_configuration_and_checkpoint_errors(tmp_path):
    with pytest.raises(ConfigError, match="pass n_head=N"):
        engine.load(DATA / "ck_a.pth", family="elm-ar")
    with pytest.raises(CheckpointError, match="shape"):
        engine.load(DATA / "ck_a.pth", family="elm-ar", n_head=4, num_classes=12)
    with pytest.raises(ConfigError, match="backend must be 'auto' or 'reference'"):
        engine.load(DATA / "ck_a.pth", family="elm-ar", n_head=4, backend="native")
    for values, match in [(dict(code_dim=40), "exceeds the engine's limit"), (dict(use_adaLN=True), "not supported"),
                          (dict(block_size=15), "must be a square"), (dict(dim=40, n_head=4), "multiple of 4"),
                          (dict(dim=64, n_head=3), "not divisible"), (dict(n_layer="x"), "n_layer"),
                          (dict(attn_type="cs"), "not supported"), (dict(dim=64, n_head=4, n_kv_head=3), "multiple"),
                          (dict(dim=16384, n_layer=256, n_head=16), "MAX_PARAMS")]:
        with pytest.raises(ConfigError, match=match):
            ELMConfig(**values)
    with pytest.raises(ConfigError, match="unknown config fields"):
        ELMConfig.from_dict({"bogus": 1})
    with pytest.raises(CheckpointError, match="not found"):
        engine.load_bae(tmp_path / "missing.th")
    with pytest.raises(CheckpointError, match="not a binary autoencoder"):
        engine.load_bae(DATA / "ck_a.pth")
    (tmp_path / "junk.th").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.th"):
        engine.load_bae(tmp_path / "junk.th")
    state = torch.load(DATA / "binaryae_ema.th", weights_only=True)
    state["ae.generator.blocks.1.weight"] = torch.zeros(5, 32, 3, 3)
    torch.save(state, tmp_path / "bad.th")
    with pytest.raises(CheckpointError, match="generator block"):
        engine.load_bae(tmp_path / "bad.th")
    assert all(issubclass(e, EngineError) for e in (CheckpointError, ConfigError, SamplingError))
