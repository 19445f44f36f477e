"""ELM's masked family ("elm-mlm"): the published MaskGIT-style generate_cfg reproduced token for
token, the engine's sample_tokens idiom (per-image generators), the graph-safe refinement step
and its masking rule, loading, drop-in use and errors.

Goldens: tests/data/elm_mlm (recorded by make_elm_mlm_outputs.py from the published code on CPU)."""
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import engine
from engine.core.counting import count_ops
from engine.core.errors import CheckpointError, ConfigError, SamplingError
from engine.families.elm_mlm import ELMMLMConfig, ELMMLMModel, infer_sizes, refine_step
from engine.models.elm_mlm import ELMMLMTransformer

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = Path(__file__).resolve().parents[2] / "data" / "elm_mlm"
META = json.loads((DATA / "runs.json").read_text())
GOLD = load_file(str(DATA / "tokens.safetensors"))
RUNS = {r["name"]: r for r in META["runs"]}
# What a user passes for these small configurations: what a bare state dict cannot tell.
SIZES = {"a": dict(n_head=4),
         "b": dict(n_head=2, n_kv_head=1, norm_eps=1e-6, rope_base=500.0, mask_schtype="linear"),
         "c": dict(n_head=2),
         "d": dict(n_head=2, pos_type="rope1d")}
BAE = Path(__file__).resolve().parents[2] / "data" / "elm" / "binaryae_ema.th"     # 8 bits: config a's 2 x 4


@pytest.fixture(scope="module")
def models():
    return {name: engine.load(DATA / f"ck_{name}.pth", family="elm-mlm", **sizes) for name, sizes in SIZES.items()}


def call_generate_cfg(model, run):
    torch.manual_seed(run["seed"])
    np.random.seed(run["seed"])
    out = model.generate_cfg(None, torch.tensor(run["cond"]), run["num_iter"], temperature=run["temperature"],
                             top_k=run["top_k"], cfg_scale=run["cfg_scale"], remask=run["remask"],
                             cfg_schedule=run["cfg_schedule"], scale_pow=run["scale_pow"])
    return out, torch.rand(4), torch.from_numpy(np.random.random(4))


def check_run(model, name):
    run = RUNS[name]
    (tokens, logits), after, np_after = call_generate_cfg(model, run)
    want = GOLD[f"{name}.tokens"]
    assert tokens.dtype == torch.int64 and tokens.shape == want.shape
    assert torch.equal(tokens, want), f"{name}: {(tokens != want).sum()} sub-tokens differ"
    assert torch.equal(after, GOLD[f"{name}.after"]), "torch's global RNG not left as the published code leaves it"
    assert torch.equal(np_after, GOLD[f"{name}.np_after"]), "numpy's global RNG not left as published"
    # CFG scales the two passes' float32 rounding (which differs between CPUs' GEMM kernels: 1.3e-5
    # seen on an AVX2-only EPYC against goldens recorded on AVX-512)
    torch.testing.assert_close(logits, GOLD[f"{name}.logits"], rtol=1e-4, atol=5e-5)


def test_goldens_cover_the_brief():
    runs, configs = META["runs"], META["configs"]
    assert {r["cfg_schedule"] for r in runs} == {"linear", "constant", "powercos"}
    assert {r["top_k"] is None for r in runs} == {True, False} and {r["remask"] for r in runs} == {True, False}
    assert any(r["cfg_scale"] == 1.0 for r in runs) and any(r["cfg_scale"] > 1.0 for r in runs)
    assert any(r["temperature"] not in (0.0, 1.0) for r in runs) and any(r["scale_pow"] != 1.0 for r in runs)
    assert {c["token_each"] for c in configs.values()} == {1, 2, 3}
    assert {c["block_size"] for c in configs.values()} == {16, 64}                 # 4x4 and 8x8 grids
    assert {c.get("mask_schtype", "cos") for c in configs.values()} == {"cos", "linear"}
    assert {c.get("pos_type", "rope2d") for c in configs.values()} == {"rope2d", "rope1d"}
    failures = {f["call"]: f["error"] for f in META["failures"]}
    assert "no attribute 'model_type'" in failures["ModelArgs without model_type"]
    assert failures["top_k=0 (unused)"] is None                                    # top_k is never read


@pytest.mark.parametrize("name", sorted(RUNS))
def test_generate_cfg_reproduces_the_published_tokens(models, name):
    check_run(models[RUNS[name]["config"]], name)


@pytest.mark.parametrize("name", ["a", "b", "c", "d"])
def test_module_forward_equals_the_published_forward(models, name):
    # The published forward passes an all-True attention mask; the engine passes none.
    m = models[name].module
    logits = m(GOLD[f"forward.{name}.idx"], GOLD[f"forward.{name}.cond"])
    torch.testing.assert_close(logits, GOLD[f"forward.{name}"], rtol=1e-5, atol=1e-5)


def test_rope2d_cannot_tell_a_masked_positions_sub_tokens_apart(models):
    # Published rope2d: the sub-tokens of a masked position share the mask embedding and the
    # rotation, so their logits are equal; rope1d rotates every element and they differ.
    for name, equal in (("a", True), ("d", False)):
        m = models[name].module
        c = m.config
        idx = torch.full((1, c.block_size, c.token_each), m.mask_id)
        logits = m(idx, torch.tensor([1])).view(1, c.block_size, c.token_each, -1)
        assert torch.equal(logits[:, :, 0], logits[:, :, 1]) is equal, name


@dataclass
class ModelArgs:
    """The published ModelArgs' fields and defaults (llama/mlm_model.py): no model_type."""
    mask_ratio_min: float = 0.5
    mask_ratio_max: float = 1.0
    mask_ratio_mu: float = 0.55
    mask_ratio_std: float = 0.25
    pause: bool = False
    pause_num: int = 10
    use_adaLN: bool = False
    smoothing: float = 0.1
    gen_iter: int = 10
    maskpersample: bool = False
    mask_schstep: int = 10000
    mask_schtype: str = "cos"
    norm_type: str = "RMS"
    pos_type: str = "rope2d"
    token_each: int = 4
    cls_row: bool = False
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
    vocab_size: int = 256
    cls_token_num: int = 1
    block_size: int = 256
    max_batch_size: int = 32
    max_seq_len: int = 2048


def published_standin(name):
    """An object with the attributes, `config` and state dict of a published masked Transformer."""
    values = META["configs"][name]
    module = ELMMLMTransformer(ELMMLMConfig.from_dict(values))
    module.load_state_dict(torch.load(DATA / f"ck_{name}.pth", weights_only=True))
    obj = torch.nn.Module()
    for child in ("cls_embedding", "tok_embedder", "pos_embed", "layers", "proj", "norm", "output", "mlm_layer"):
        if hasattr(module, child):
            obj.add_module(child, getattr(module, child))
    obj.config = ModelArgs(**values)
    obj.config.model_type = "c2i"          # what a user adds to make the published class construct
    obj.generate_cfg = lambda *a, **k: "published generate_cfg"
    return obj


@pytest.mark.parametrize("name", ["a_remask", "b_linear", "c_const"])
def test_accelerate_a_published_instance(name):
    config = RUNS[name]["config"]
    model = engine.accelerate(published_standin(config))
    assert isinstance(model, ELMMLMModel) and model.family == "elm-mlm"
    check_run(model, name)
    patched = engine.patch(published_standin(config))
    check_run(patched, name)   # generate_cfg replaced in place
    assert patched.engine_model.family == "elm-mlm"


def test_sample_tokens_without_generator_is_generate_cfg(models):
    model, run = models["a"], RUNS["a_linear"]
    torch.manual_seed(run["seed"])
    np.random.seed(run["seed"])
    tokens = model.sample_tokens(2, labels=run["cond"], num_iter=run["num_iter"], cfg=run["cfg_scale"],
                                 cfg_schedule="linear", temperature=run["temperature"])
    assert torch.equal(tokens, GOLD["a_linear.tokens"])


def test_generators_one_per_image_equal_solo_runs(models):
    model = models["a"]
    labels, cfgs, temps, schedules = [0, 3, 9], [2.0, 3.0, 1.0], [1.0, 0.5, 2.0], ["linear", "constant", "powercos"]
    settings = dict(num_iter=6, top_k=10, top_p=0.95, remask=True, scale_pow=2.0)
    gens = [torch.Generator().manual_seed(s) for s in (11, 12, 13)]
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()[1].copy()
    batch = model.sample_tokens(3, labels=labels, cfg=cfgs, cfg_schedule=schedules, temperature=temps,
                                generator=gens, **settings)
    assert torch.equal(torch.get_rng_state(), torch_state)       # no global RNG read
    assert np.array_equal(np.random.get_state()[1], np_state)
    assert batch.shape == (3, 16, 2) and int(batch.max()) < 16   # every position filled
    for i, seed in enumerate((11, 12, 13)):
        solo = model.sample_tokens(1, labels=[labels[i]], cfg=cfgs[i], cfg_schedule=schedules[i],
                                   temperature=temps[i], generator=[torch.Generator().manual_seed(seed)], **settings)
        assert torch.equal(batch[i:i + 1], solo), i
    one = model.sample_tokens(3, labels=labels, cfg=2.0, generator=torch.Generator().manual_seed(5))
    again = model.sample_tokens(3, labels=labels, cfg=2.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(one, again) and not torch.equal(one, batch)
    uncond = model.sample_tokens(2, labels=None, generator=torch.Generator().manual_seed(5))
    assert uncond.shape == (2, 16, 2) and int(uncond.max()) < 16


class FixedLogits:
    """A stand-in transformer: the same logits [B, S * T, V] whatever the tokens."""

    def __init__(self, logits, mask_id):
        self.logits, self.mask_id = logits, mask_id

    def __call__(self, tokens, rows):
        return self.logits


def test_masking_rule_ties_shared_count_and_remask():
    # 2 images, 4 positions, 1 sub-token, 3 values (+ mask id 3). Confidence = log p exactly
    # (zero noise). Image 0: position 0 known; positions 1 and 2 tie.
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]] * 4)).repeat(2, 1, 1)
    logits[0, 3] = torch.log(torch.tensor([0.05, 0.9, 0.05]))
    tokens = torch.tensor([[2, 3, 3, 3], [3, 3, 3, 3]]).unsqueeze(-1)
    draw = torch.ones(2, 4, 3)                        # the race picks each position's likeliest value
    zero = torch.zeros(2, 4, 1)
    stub = FixedLogits(logits, 3)
    sampled, nxt, _ = refine_step(stub, tokens, None, None, draw, zero, torch.tensor(1), None, True)
    assert sampled[..., 0].tolist() == [[2, 0, 0, 1], [0, 0, 0, 0]]     # known value kept
    # n = 1 but image 0's two lowest (0.7 at positions 1, 2) tie: both masked; image 1 all tie.
    assert (nxt[..., 0] == 3).tolist() == [[False, True, True, False], [True, True, True, True]]
    # Shared count: image 0 has 3 unknown -> n = min(3 - 1, 10) = 2 for both images; per image:
    # image 1 (4 unknown) re-masks min(4 - 1, 10) = 3 (all tied -> all 4 masked either way).
    distinct = logits.clone()
    distinct[1] = torch.log(torch.tensor([[0.9, 0.05, 0.05], [0.8, 0.1, 0.1], [0.6, 0.2, 0.2], [0.5, 0.3, 0.2]]))
    stub = FixedLogits(distinct, 3)
    _, shared, _ = refine_step(stub, tokens, None, None, draw, zero, torch.tensor(10), None, True)
    _, own, _ = refine_step(stub, tokens, None, None, draw, zero, torch.tensor(10), None, False)
    assert (shared[1, :, 0] == 3).tolist() == [False, False, True, True]
    assert (own[1, :, 0] == 3).tolist() == [False, True, True, True]
    # remask: a known sub-token whose fresh draw differs gets the fresh draw's probability.
    known = torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]]).unsqueeze(-1)
    on, off = torch.tensor(True), torch.tensor(False)
    _, nxt_on, _ = refine_step(stub, known, None, None, draw, zero, torch.tensor(1), on, True)
    _, nxt_off, _ = refine_step(stub, known, None, None, draw, zero, torch.tensor(1), off, True)
    # All known: U = 0, n = max(1, min(-1, 1)) = 1. Without remask every confidence is +inf: all
    # tie and all are masked (published `<=`). With it, image 0's positions 0..2 re-drew 0 != 1
    # (p 0.7) and position 3 re-drew 1 (same value: stays +inf); image 1 re-drew its values.
    assert (nxt_off[..., 0] == 3).all()
    assert (nxt_on[..., 0] == 3).tolist() == [[True, True, True, False], [True, True, True, True]]


def test_refinement_step_compiles_fullgraph_without_host_syncs(models):
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = models["a"]
    c = model.config
    rows = torch.tensor([1, 7, 10, 10])          # [cond; null] for two images
    scales = [torch.tensor([2.0, 3.5]), torch.tensor([1.5, 1.0]), torch.tensor([4.0, 2.0])]
    counter = CompileCounter()
    compiled = torch.compile(model.refine_step, fullgraph=True, backend=counter, dynamic=False)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.full((2, c.block_size, c.token_each), c.mask_id)
    for step, (scale, floor) in enumerate(zip(scales, (12, 6, 0))):
        draw = torch.empty(2, c.block_size * c.token_each, c.vocab_size).exponential_(1, generator=gen)
        noise = torch.randn(2, c.block_size, c.token_each, generator=gen)
        args = (tokens, rows, scale, draw, noise, torch.tensor(floor), torch.tensor(step < 2), True)
        got = compiled(*args)
        want, counts = count_ops(model.refine_step, *args)
        assert counts.host_syncs == 0
        assert not any("nonzero" in op or "multinomial" in op or "item" in op for op in counts.counts)
        for g, w in zip(got, want):
            assert torch.equal(g, w) if g.dtype == torch.int64 else torch.allclose(g, w, rtol=1e-5, atol=1e-5)
        unknown_before = int((tokens[0, :, 0] == c.mask_id).sum())
        tokens = got[1]
        assert int((tokens[0, :, 0] == c.mask_id).sum()) == max(1, min(unknown_before - 1, floor))
    assert counter.frame_count == 1      # one graph for every step: per-step values are tensors


def test_generate_decodes_mlm_tokens(models):
    model, bae = models["a"], engine.load_bae(BAE)
    gens = lambda: [torch.Generator().manual_seed(s) for s in (1, 2)]  # noqa: E731
    images = engine.generate(model, [3, 4], bae=bae, cfg=2.0, num_iter=4, generator=gens(), output_type="np")
    assert images.shape == (2, 8, 8, 3) and images.min() >= 0 and images.max() <= 1
    tokens = model.sample_tokens(2, labels=[3, 4], cfg=2.0, num_iter=4, generator=gens())
    want = bae.decode_indices(tokens).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(images, want)
    assert engine.generate(model, num_images=1, bae=bae, output_type="pil")[0].size == (8, 8)
    with pytest.raises(SamplingError, match="bits per position"):
        engine.generate(models["b"], [1], bae=bae)


def test_family_recognition_presets_and_engine_format(tmp_path, models):
    auto = engine.load(DATA / "ck_c.pth", n_head=2)            # recognised from its mlm_layer keys
    assert auto.family == "elm-mlm" and auto.config.pause and auto.config.token_each == 3
    ar = engine.load(Path(__file__).resolve().parents[2] / "data" / "elm" / "ck_a.pth", n_head=4, block_size=16)
    assert ar.family == "elm-ar"                               # AR checkpoints still load as AR
    with torch.device("meta"):
        big = ELMMLMTransformer(ELMMLMConfig.from_preset("GPT-L", token_each=1, code_dim=16))
    assert infer_sizes(big.state_dict()) == dict(num_classes=1000, dim=1024, code_dim=16, pause=False, token_each=1,
                                                 block_size=256, n_layer=24, ffn_hidden_dim=2816, n_head=16)
    assert big.config.estimate_params() == sum(p.numel() for p in big.parameters())
    engine.convert(DATA / "ck_b.pth", tmp_path / "b", family="elm-mlm", **SIZES["b"])
    again = engine.load(tmp_path / "b")
    assert again.family == "elm-mlm" and again.config.mask_schtype == "linear"
    check_run(again, "b_linear")


@pytest.mark.parametrize("call,match", [
    (lambda m: m.generate_cfg(None, None, 4), "needs cond"),
    (lambda m: m.generate_cfg(None, torch.tensor([11]), 4), "label 11 is out of range"),
    (lambda m: m.generate_cfg(None, torch.tensor([1.0]), 4), "integers"),
    (lambda m: m.generate_cfg(None, torch.tensor([1]), 0), "num_iter must be at least 1"),
    (lambda m: m.generate_cfg(None, torch.tensor([1]), 2.5), "num_iter must be an integer"),
    (lambda m: m.generate_cfg(None, torch.tensor([1]), 4, cfg_schedule="cos"), "unknown cfg_schedule"),
    (lambda m: m.generate_cfg(None, torch.tensor([1]), 4, cfg_scale=float("nan")), "cfg_scale must be"),
    (lambda m: m.generate_cfg(None, torch.tensor([1]), 4, temperature=-1.0), "temperature must be .* >= 0"),
    (lambda m: m.generate_cfg(None, torch.tensor([1]), 4, top_k=0), "top_k must be at least 1"),
    (lambda m: m.generate_cfg(None, torch.tensor([1]), 4, remask="yes"), "remask must be True or False"),
    (lambda m: m.generate_cfg(None, torch.tensor([1]), 4, scale_pow=float("inf")), "scale_pow"),
    (lambda m: m.sample_tokens(2, labels=[0, 10]), "label 10 is out of range"),
    (lambda m: m.sample_tokens(2, labels=[1]), "expected 2 labels"),
    (lambda m: m.sample_tokens(0), "bsz must be at least 1"),
    (lambda m: m.sample_tokens(1, cfg="3"), "cfg must be a finite number"),
    (lambda m: m.sample_tokens(2, cfg=[1.0, 2.0, 3.0]), "cfg has 3 entries for 2 images"),
    (lambda m: m.sample_tokens(1, temperature=float("inf")), "temperature"),
    (lambda m: m.sample_tokens(1, top_p=1.5), "top_p"),
    (lambda m: m.sample_tokens(2, generator=[torch.Generator()]), "1 generators for 2 images"),
    (lambda m: engine.generate(m, [1]), "bae=engine.load_bae"),
])
def test_sampling_errors_are_clear(models, call, match):
    with pytest.raises(SamplingError, match=match):
        call(models["a"])


def test_configuration_and_checkpoint_errors():
    with pytest.raises(ConfigError, match="pass n_head=N"):
        engine.load(DATA / "ck_a.pth", family="elm-mlm")
    with pytest.raises(CheckpointError, match="shape"):
        engine.load(DATA / "ck_a.pth", family="elm-mlm", n_head=4, num_classes=12)
    with pytest.raises(CheckpointError, match="keys"):
        engine.load(DATA / "ck_a.pth", family="elm-ar", n_head=4, block_size=16)
    with pytest.raises(ConfigError, match="backend must be 'auto' or 'reference'"):
        engine.load(DATA / "ck_a.pth", family="elm-mlm", n_head=4, backend="native")
    for values, match in [(dict(pos_type="sincos"), "pos_type"), (dict(mask_schtype="square"), "mask_schtype"),
                          (dict(cls_token_num=2), "cls_token_num"), (dict(block_size=15), "must be a square"),
                          (dict(dim=40, n_head=4), "multiple of 4"), (dict(code_dim=40), "exceeds the engine's limit"),
                          (dict(n_layer="x"), "n_layer")]:
        with pytest.raises(ConfigError, match=match):
            ELMMLMConfig(**values)
    ELMMLMConfig.from_dict(dict(model_type="c2i", use_adaLN=True, norm_type="LN", smoothing=0.0))   # ignored
    no_null = ELMMLMModel(ELMMLMTransformer(ELMMLMConfig(dim=16, n_layer=1, n_head=2, token_each=1, code_dim=2,
                                                         block_size=4, num_classes=3, class_dropout_prob=0.0)))
    with pytest.raises(SamplingError, match="no CFG null class"):
        no_null.generate_cfg(None, torch.tensor([1]), 2)
    assert no_null.sample_tokens(1, labels=[2], num_iter=2).shape == (1, 4, 1)   # cfg 1 needs no null class
