"""Training: a few steps of the MAR objective on a tiny config, the loss pieces, and the trained
state's round trip through the engine format."""
import json
import math

import numpy as np
import pytest
import torch

import engine
from engine.builtin.digits import load_split
from engine.loading import save_engine_dir
from engine.models.mar import MAR
from engine.builtin.training import (TrainConfig, TrainTables, digits_config, init_weights, mar_loss,
                          sample_mask_ratio, train)

TINY = dict(img_size=8, patch_size=2, encoder_embed_dim=32, decoder_embed_dim=32, encoder_depth=1,
            decoder_depth=1, encoder_num_heads=2, decoder_num_heads=2, buffer_size=2, diffloss_d=1,
            diffloss_w=32, num_sampling_steps="10")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data():
    images, labels = load_split("train", size=8)
    return images[:256], labels[:256]


@pytest.fixture(scope="module")
def trained(data):
    config = digits_config(**TINY)
    tc = TrainConfig(steps=60, batch_size=32, lr=3e-3, warmup_steps=5, log_every=10, threads=0,
                     ema_decay=0.9)
    result = train(config, tc, *data, log=None)
    return config, result


def test_loss_finite_and_decreasing(trained):
    _, result = trained
    losses = [h["loss"] for h in result["history"]]
    assert len(losses) == 6
    assert all(math.isfinite(x) for x in losses)
    # Zero-initialised output layer: eps = 0 gives mse 1 at the start; a few steps must beat it.
    assert losses[-1] < 0.8 * losses[0], losses
    assert result["history"][-1]["mse"] < 0.9


def test_training_is_reproducible_from_seed(data):
    config = digits_config(**TINY)
    tc = TrainConfig(steps=3, batch_size=16, log_every=1, threads=0)
    a = train(config, tc, *data, log=None)
    b = train(config, tc, *data, log=None)
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    for key, value in a["ema"].items():
        assert torch.equal(value, b["ema"][key]), key


def test_interrupted_run_resumes_exactly(data, tmp_path):
    config = digits_config(**TINY)
    tc = TrainConfig(steps=6, batch_size=16, log_every=1, threads=0)
    whole = train(config, tc, *data, log=None)

    class Interrupt(Exception):
        pass

    def stop(step, state):
        raise Interrupt

    resume = tmp_path / "resume.pt"
    with pytest.raises(Interrupt):
        train(config, tc, *data, log=None, on_snapshot=stop, snapshot_every=4, resume_path=resume,
              resume_every=3)
    assert resume.exists()
    resumed = train(config, tc, *data, log=None, resume_path=resume, resume_every=3)
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in whole["history"]]
    for key, value in whole["ema"].items():
        assert torch.equal(value, resumed["ema"][key]), key
    other = TrainConfig(steps=7, batch_size=16, log_every=1, threads=0)
    with pytest.raises(engine.ConfigError):
        train(config, other, *data, log=None, resume_path=resume, resume_every=3)


def test_ema_state_matches_model_keys(trained):
    config, result = trained
    keys = set(MAR(config).state_dict())
    assert set(result["ema"]) == keys
    assert set(result["model"]) == keys
    # The EMA lags the raw weights.
    assert any(not torch.equal(result["ema"][k], result["model"][k]) for k in keys)


def test_mask_ratio_is_truncated_gaussian_near_one():
    gen = torch.Generator().manual_seed(0)
    draws = np.array([sample_mask_ratio(gen, 0.7) for _ in range(4000)])
    assert draws.min() >= 0.7 and draws.max() <= 1.0
    # Left half of N(1, 0.25) cut at 0.7: mean about 0.86, density highest near 1.
    assert 0.84 < draws.mean() < 0.88
    assert (draws > 0.9).mean() > (draws < 0.8).mean()


def test_label_dropout_replaces_class_embedding(data):
    config = digits_config(**TINY)
    torch.manual_seed(0)
    mar = init_weights(MAR(config))
    with torch.no_grad():
        mar.class_emb.weight.normal_()
        # The head starts with zero adaLN and output layers, where z cannot matter yet.
        for name, p in mar.diffloss.net.named_parameters():
            if "adaLN" in name or "final_layer.linear" in name:
                p.normal_(std=0.1)
    tables = TrainTables()
    images, labels = data[0][:8], data[1][:8]

    def loss(lbl, p):
        return mar_loss(mar, tables, images, lbl, torch.Generator().manual_seed(1), label_drop_prob=p)[0]

    other = (labels + 1) % 10
    # Every label dropped: the class cannot matter; none dropped: it does.
    assert torch.equal(loss(labels, 0.999999), loss(other, 0.999999))
    assert not torch.equal(loss(labels, 0.0), loss(other, 0.0))


def test_variance_output_gets_gradient_only_from_vb(data):
    """The VLB term trains v with eps frozen; eps is trained by the MSE alone."""
    from engine.builtin.training import diffusion_loss

    config = digits_config(**TINY)
    torch.manual_seed(0)
    net = init_weights(MAR(config)).diffloss.net
    out = net.final_layer
    with torch.no_grad():
        for p in (out.linear.weight, out.adaLN_modulation[-1].weight):
            p.normal_(std=0.1)
    c = config.token_dim
    target, z = torch.rand(64, c) * 2 - 1, torch.randn(64, config.decoder_embed_dim)
    _, mse, vb = diffusion_loss(net, TrainTables(), target, z, torch.Generator().manual_seed(0), repeat=2)
    assert mse.shape == vb.shape == (128,)
    vb.mean().backward()
    assert out.linear.weight.grad[:c].abs().sum() == 0
    assert out.linear.weight.grad[c:].abs().sum() > 0
    net.zero_grad()
    _, mse, vb = diffusion_loss(net, TrainTables(), target, z, torch.Generator().manual_seed(0), repeat=2)
    mse.mean().backward()
    assert out.linear.weight.grad[:c].abs().sum() > 0
    assert out.linear.weight.grad[c:].abs().sum() == 0
    assert (vb >= 0).all()


def test_mar_loss_stats(data):
    config = digits_config(**TINY)
    torch.manual_seed(0)
    mar = init_weights(MAR(config))
    loss, stats = mar_loss(mar, TrainTables(), data[0][:8], data[1][:8], torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert 0.7 <= stats["mask_ratio"] <= 1.0 and stats["vb"] >= 0


def test_round_trip_through_engine_format(trained, tmp_path):
    config, result = trained
    sampling = {"cfg": 1.5, "num_iter": 4, "temperature": 1.0}
    save_engine_dir(result["ema"], config, tmp_path / "m", {"sampling": sampling})
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    assert meta["config"]["clip_denoised"] is True and meta["config"]["tokenizer"] == "pixels"
    model = engine.load(tmp_path / "m", backend="reference")
    assert model.sampling_defaults == sampling
    assert model.config.clip_denoised and model.config.clip_range == (-1.0, 1.0)
    for key, value in model.state_dict().items():
        assert torch.equal(value, result["ema"][key]), key
    images = engine.generate(model, [0, 1, 2], num_iter=4, cfg=1.5, output_type="np",
                             generator=torch.Generator().manual_seed(0))
    assert images.shape == (3, 8, 8, 1)
    assert np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1


def test_train_command(tmp_path):
    from engine.cli import main

    out = tmp_path / "cli"
    args = ["train", "--out", str(out), "--steps", "2", "--batch-size", "8", "--img-size", "8",
            "--patch-size", "2", "--width", "32", "--heads", "2", "--encoder-depth", "1",
            "--decoder-depth", "1", "--head-depth", "1", "--head-width", "32", "--buffer-size", "2",
            "--log-every", "1", "--threads", "0", "--cfg", "2.5", "--num-iter", "8"]
    assert main(args) == 0
    meta = json.loads((out / "config.json").read_text())
    assert meta["sampling"]["cfg"] == 2.5 and meta["sampling"]["num_iter"] == 8
    assert meta["training"]["steps"] == 2 and meta["training"]["seed"] == 0
    assert (out / "model.safetensors").exists()
    assert len(json.loads((out / "history.json").read_text())) == 2
    engine.load(out, backend="reference")
