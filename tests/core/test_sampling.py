"""Sampling for configurations beyond the golden one, generator runs, and bad inputs."""
import numpy as np
import pytest
import torch

import engine
from engine import SamplingError
from engine.families.mar import MARModel
from engine.core.plan import build_plan
from helpers import published_standin, random_mar, rel_err, spec_sample_tokens, spec_transformer

CONFIGS = {
    "patch2-widths-buffer": dict(patch_size=2, vae_embed_dim=4, img_size=128, encoder_embed_dim=48,
                                 decoder_embed_dim=32, encoder_num_heads=3, decoder_num_heads=2,
                                 buffer_size=3, class_num=7, num_sampling_steps="ddim10"),
    "sections-deep": dict(encoder_depth=2, decoder_depth=3, buffer_size=0, class_num=3,
                          num_sampling_steps="10,5", diffloss_d=3),
    "pixels-clip": dict(img_size=8, vae_stride=1, patch_size=2, vae_embed_dim=1, tokenizer="pixels",
                        clip_denoised=True, num_sampling_steps="12", decoder_depth=1),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_transformer_matches_spec_for_any_config(name):
    mar = random_mar(1, **CONFIGS[name])
    c = mar.config
    gen = torch.Generator().manual_seed(0)
    b, known = 3, c.seq_len // 3
    tokens = torch.randn(b, c.seq_len, c.token_dim, generator=gen)
    order = torch.argsort(torch.rand(b, c.seq_len, generator=gen), dim=1)
    mask = torch.ones(b, c.seq_len).scatter(1, order[:, :known], 0.0)
    class_emb = mar.class_embedding(torch.tensor([0, 1, 2]), b, cfg=False)
    with torch.no_grad():
        want = spec_transformer(mar, tokens, mask, class_emb)
        got = mar.forward_masked(tokens, mask, class_emb)
    assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("cfg,schedule", [(1.0, "linear"), (2.5, "linear"), (1.7, "constant")])
def test_sample_tokens_matches_spec_for_any_config(name, cfg, schedule):
    mar = random_mar(2, **CONFIGS[name])
    model = MARModel(mar, backend="reference")
    labels = [1, 2]
    kwargs = dict(num_iter=5, cfg=cfg, cfg_schedule=schedule, temperature=0.95)
    torch.manual_seed(3)
    np.random.seed(3)
    got = model.sample_tokens(2, labels=labels, **kwargs)
    torch.manual_seed(3)
    np.random.seed(3)
    want = spec_sample_tokens(mar, 2, labels=labels, **kwargs)
    assert got.shape == (2, mar.config.vae_embed_dim, mar.config.seq_h * mar.config.patch_size,
                         mar.config.seq_h * mar.config.patch_size)
    assert rel_err(got, want) <= 1e-4
    if mar.config.clip_denoised:
        assert got.abs().max() <= 1.5  # x0 clipped to [-1, 1]; only the last step's noise adds


def test_accelerate_reads_a_custom_configuration():
    mar = random_mar(4, **CONFIGS["patch2-widths-buffer"])
    accelerated = engine.accelerate(published_standin(mar), backend="reference")
    for key in ("patch_size", "encoder_embed_dim", "decoder_embed_dim", "encoder_num_heads",
                "decoder_num_heads", "buffer_size", "class_num", "num_sampling_steps"):
        assert getattr(accelerated.config, key) == getattr(mar.config, key), key


def test_more_steps_than_tokens_skips_empty_steps():
    mar = random_mar(5, img_size=32)          # 2x2 = 4 tokens
    model = MARModel(mar, backend="reference")
    plan = build_plan(1, 10, 4)
    assert [s.num_predict for s in plan.steps] == [1, 1, 1, 1]
    torch.manual_seed(0)
    np.random.seed(0)
    got = model.sample_tokens(2, num_iter=10, cfg=2.0, labels=[0, 1])
    torch.manual_seed(0)
    np.random.seed(0)
    want = spec_sample_tokens(mar, 2, num_iter=10, cfg=2.0, labels=[0, 1])
    assert rel_err(got, want) <= 1e-4


def test_generator_runs_are_deterministic_and_ignore_global_rng():
    model = MARModel(random_mar(6), backend="reference")
    outs = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        np.random.seed(global_seed)
        g = torch.Generator().manual_seed(123)
        outs.append(model.sample_tokens(2, num_iter=4, cfg=2.0, labels=[3, 4], generator=g))
    assert torch.equal(outs[0], outs[1])
    torch.manual_seed(7)
    before = torch.get_rng_state()
    np_before = np.random.get_state()[1].copy()
    other = model.sample_tokens(2, num_iter=4, cfg=2.0, labels=[3, 4],
                                generator=torch.Generator().manual_seed(124))
    assert torch.equal(torch.get_rng_state(), before)
    assert np.array_equal(np.random.get_state()[1], np_before)
    assert not torch.allclose(other, outs[0])


@pytest.fixture(scope="module")
def small_model():
    return MARModel(random_mar(7), backend="reference")


@pytest.mark.parametrize("kwargs,message", [
    (dict(bsz=0), "bsz must be at least 1"),
    (dict(bsz=2.0), "bsz must be an integer"),
    (dict(num_iter=0), "num_iter must be at least 1"),
    (dict(num_iter=-3), "num_iter must be at least 1"),
    (dict(num_iter=2.5), "num_iter must be an integer"),
    (dict(labels=[1]), "expected 2 labels"),
    (dict(labels=[[1, 2]]), r"expected 2 labels .*shape \(1, 2\)"),
    (dict(labels=[1, 10]), "label 10 is out of range: this model has 10 classes"),
    (dict(labels=[-1, 0]), "label -1 is out of range"),
    (dict(labels=[1.5, 2.0]), "labels must be integers"),
    (dict(labels=torch.tensor([1.0, 2.0])), "labels must be integers"),
    (dict(labels=["a", "b"]), "labels must be integers"),
    (dict(temperature=0.0), "temperature must be a finite number > 0"),
    (dict(temperature=-1.0), "temperature must be a finite number > 0"),
    (dict(temperature=float("nan")), "temperature must be a finite number > 0"),
    (dict(cfg_schedule="cosine"), "unknown cfg_schedule 'cosine'"),
    (dict(cfg=float("inf")), "cfg must be a finite number"),
    (dict(generator=123), "generator must be a torch.Generator"),
])
def test_bad_inputs_have_clear_messages(small_model, kwargs, message):
    call = dict(bsz=2, num_iter=2, labels=[1, 2])
    call.update(kwargs)
    with pytest.raises(SamplingError, match=message):
        small_model.sample_tokens(**call)


@pytest.mark.parametrize("steps,message", [
    ("ddim999", "no integer stride gives exactly 999"),
    ("2000", "cannot take 2000 steps from a section of 1000"),
    ("10,abc", "expected an integer, 'ddimN' or comma-separated integers"),
    ("0", "every section needs at least one step"),
    ("ddimx", "expected 'ddimN'"),
])
def test_impossible_respacing_is_rejected(steps, message):
    with pytest.raises(engine.ConfigError, match=message):
        MARModel(random_mar(8), backend="reference", num_sampling_steps=steps)


def test_generate_output_types():
    mar = random_mar(9, **CONFIGS["pixels-clip"])
    model = MARModel(mar, backend="reference")
    g = torch.Generator().manual_seed(0)
    arr = engine.generate(model, [0, 1, 2], num_iter=3, output_type="np", generator=g)
    assert arr.shape == (3, 8, 8, 1) and arr.dtype == np.float32
    assert arr.min() >= 0 and arr.max() <= 1
    pt = engine.generate(model, [0, 1, 2], num_iter=3, output_type="pt",
                         generator=torch.Generator().manual_seed(0))
    assert torch.allclose(pt.permute(0, 2, 3, 1), torch.from_numpy(arr))
    pil = engine.generate(model, [0], num_iter=3, output_type="pil")
    assert pil[0].size == (8, 8)
    with pytest.raises(SamplingError, match="output_type must be one of"):
        engine.generate(model, [0], output_type="jpg")
    latent_model = MARModel(random_mar(10), backend="reference")
    with pytest.raises(SamplingError, match="pass vae=engine.load_vae"):
        engine.generate(latent_model, [0], num_iter=2)


def test_precision_options_on_cpu():
    with pytest.raises(engine.ConfigError, match="precision 'fp16' is for CUDA devices; on CPU use"):
        MARModel(random_mar(11), backend="reference", precision="fp16")
    with pytest.raises(engine.ConfigError, match="precision must be one of"):
        MARModel(random_mar(11), backend="reference", precision="half")
    model = MARModel(random_mar(11), backend="reference", precision="bf16")
    assert model.autocast_dtype == torch.bfloat16
