"""The built-in discrete digit pieces: the digits BAE (engine/builtin/assets/digits-bae), its codes, the
shipped digits-elm-ar model, and the training tasks of engine/builtin/train_discrete.py."""
import json

import numpy as np
import pytest
import torch

import engine
from engine.builtin.digits import load_split, per_class_subset
from engine.builtin.discrete_digits import (BAE_ASSET, BAEConfig, DigitsBAE, digits_codes, encode_digits,
                                    load_digits_bae, save_digits_bae)
from engine.core.errors import CheckpointError, ConfigError, EngineError, SamplingError
from engine.builtin.evaluate import classify, load_classifier
from engine.builtin.training import TrainConfig, train
from engine.builtin.train_discrete import BAETask, ELMARTask, digits_elm_ar_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bae():
    return load_digits_bae()


@pytest.fixture(scope="module")
def heldout():
    images, labels = load_split("heldout", 16)
    idx = per_class_subset(labels, 10)
    return images[idx], labels[idx]


@pytest.fixture(scope="module")
def classifier():
    return load_classifier(16)[0]


def test_bae_round_trip_keeps_held_out_digits_recognisable(bae, heldout, classifier):
    images, labels = heldout
    codes = encode_digits(images, bae)
    recon = engine.load_bae(BAE_ASSET).decode_indices(codes).clamp(0, 1) * 2 - 1   # the engine's decoder
    pred, _ = classify(classifier, recon)
    assert float((pred == labels).float().mean()) >= 0.95
    assert float(((recon - images) ** 2).mean()) < 0.05          # close in pixels too, not only in class


def test_codes_are_the_bits_the_decoder_reads_msb_first(bae, heldout):
    images, _ = heldout
    codes = encode_digits(images[:8], bae)
    c = bae.config
    assert codes.dtype == torch.int64 and codes.shape == (8, c.grid ** 2, c.token_each)
    bits = (bae.bit_probs(images[:8]) > 0.5).float()                # [8, K, 4, 4] thresholded bits
    # Re-stated: position p = row * grid + col; sub-token t holds bits t*code_dim .. (t+1)*code_dim - 1,
    # the first of them the most significant.
    for n in range(2):
        for p in range(c.grid ** 2):
            row, col = divmod(p, c.grid)
            for t in range(c.token_each):
                value = sum(int(bits[n, t * c.code_dim + j, row, col]) << (c.code_dim - 1 - j)
                            for j in range(c.code_dim))
                assert int(codes[n, p, t]) == value
    decoder = engine.load_bae(BAE_ASSET)
    assert torch.equal(decoder.indices_to_bits(codes), bits)
    torch.testing.assert_close(decoder.decode_indices(codes), bae.decode_bits(bits), rtol=1e-5, atol=1e-5)


def test_digits_codes_of_the_train_split(bae):
    codes, labels = digits_codes("train")
    images, want = load_split("train", 16)
    assert torch.equal(labels, want) and codes.shape == (len(images), 16, 2)
    assert torch.equal(codes[:16], encode_digits(images[:16], bae))
    first = codes[0].clone()
    codes[0] = 0                                                     # a copy: the cache is unchanged
    assert torch.equal(digits_codes("train")[0][0], first) and bool(first.any())


@pytest.fixture(scope="module")
def elm_ar(tmp_path_factory):
    return engine.load("digits-elm-ar")


def test_shipped_elm_ar_loads_from_any_directory_and_generates(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    model = engine.load("digits-elm-ar")
    assert model.family == "elm-ar" and model.bae is not None
    meta = json.loads((engine.loading.BUILTIN_MODELS["digits-elm-ar"] / "config.json").read_text())
    assert meta["sampling"] == model.sampling_defaults and "command" in meta["training"]
    images = engine.generate(model, labels=list(range(10)), output_type="np",
                             generator=torch.Generator().manual_seed(0))
    assert images.shape == (10, 16, 16, 1) and images.dtype == np.float32
    assert images.min() >= 0 and images.max() <= 1


def test_shipped_elm_ar_accuracy_at_its_defaults(elm_ar, classifier):
    labels = [c for c in range(10) for _ in range(10)]
    images = engine.generate(elm_ar, labels, output_type="pt", generator=torch.Generator().manual_seed(1))
    pred, _ = classify(classifier, images * 2 - 1)
    assert float((pred == torch.tensor(labels)).float().mean()) >= 0.85


def test_cli_sample_and_evaluate(tmp_path):
    from engine.cli import main
    from engine.builtin.evaluate import run_sweep

    out = tmp_path / "s.npz"
    assert main(["sample", "--checkpoint", "digits-elm-ar", "--per-class", "2", "--classes", "3", "7",
                 "--out", str(out)]) == 0
    data = np.load(out)
    assert data["images"].shape == (4, 16, 16, 1) and list(data["labels"]) == [3, 3, 7, 7]
    report = run_sweep("digits-elm-ar", samples_per_class=2, cfgs=[2.0], log=None)
    assert report["results"][0]["backend"] == "reference" and report["results"][0]["count"] == 20


def _smoke(task, config, steps=24):
    tc = TrainConfig(steps=steps, batch_size=16, lr=2e-3, warmup_steps=2, threads=1, log_every=8, seed=0)
    history = train(config, tc, task=task, log=None)["history"]
    assert history[-1]["loss"] < history[0]["loss"]
    return history


def test_training_tasks_reduce_their_losses():
    images, _ = load_split("train", 16)
    small = BAEConfig(nf=32, ch_mult=(1, 1, 1), emb_dim=8)
    history = _smoke(BAETask(small, images[:64]), small)
    assert {"mse", "bit_var"} <= set(history[-1])
    config = digits_elm_ar_config(dim=32, n_layer=1, n_head=2)
    codes, labels = digits_codes("train")
    history = _smoke(ELMARTask(config, codes[:64], labels[:64]), config)
    assert {"ce", "accuracy"} <= set(history[-1])


def test_bad_inputs_give_engine_errors(bae, elm_ar, tmp_path):
    with pytest.raises(EngineError, match=r"\[N, 1, 16, 16\]"):
        encode_digits(torch.zeros(2, 16, 16), bae)
    with pytest.raises(EngineError, match="NaN"):
        encode_digits(torch.full((1, 1, 16, 16), float("nan")), bae)
    with pytest.raises(EngineError, match="unknown split"):
        digits_codes("test")
    with pytest.raises(CheckpointError, match="bae.safetensors"):
        load_digits_bae(tmp_path)
    with pytest.raises(CheckpointError, match="not found"):
        engine.load_bae(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        engine.load_bae(tmp_path / "junk.safetensors")
    with pytest.raises(ConfigError, match="nf"):
        BAEConfig(nf=20)
    with pytest.raises(ConfigError, match="ch_mult"):
        BAEConfig(ch_mult="12")
    with pytest.raises(ConfigError, match="block_size"):
        ELMARTask(digits_elm_ar_config(), torch.zeros(4, 9, 2, dtype=torch.int64), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(SamplingError, match="out of range"):
        engine.generate(elm_ar, labels=[10])
    # A BAE directory whose weights do not fit its config.
    save_digits_bae(DigitsBAE(BAEConfig(emb_dim=16)), tmp_path / "other")
    cfg = json.loads((tmp_path / "other" / "bae.json").read_text())
    cfg["config"]["emb_dim"] = 32
    (tmp_path / "other" / "bae.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape"):
        load_digits_bae(tmp_path / "other")
