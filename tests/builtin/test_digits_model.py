"""The built-in digits model: data split, loading, a quick grid of 0-9, and sample quality."""
import json

import numpy as np
import torch

import engine
from engine.builtin.digits import load_split, split_indices
from engine.loading import BUILTIN_MODELS

# Measured at the shipped defaults with 5 per class at seed 0 (and 98% over 100 per class, docs/digits/quality.md);
# the bar sits far enough below that sampling noise cannot fail it, and far above what a
# broken model reaches (untrained or unclipped models score 10-40%).
MIN_ACCURACY = 0.8


def test_split_is_fixed_stratified_and_disjoint():
    train, held = split_indices()
    assert len(train) + len(held) == 1797
    assert len(np.intersect1d(train, held)) == 0
    assert 350 <= len(held) <= 370
    images, labels = load_split("heldout", 16)
    counts = np.bincount(labels.numpy(), minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38
    assert images.shape == (len(held), 1, 16, 16)
    assert images.min() >= -1 and images.max() <= 1
    small, _ = load_split("train", 8)
    assert small.shape == (len(train), 1, 8, 8)
    # 0..16 -> [-1, 1] exactly at the native resolution.
    assert set(np.unique(small.numpy() * 8 + 8).round(4)) <= set(range(17))


def test_builtin_model_files_are_small_and_configured():
    root = BUILTIN_MODELS["digits"]
    size = sum(p.stat().st_size for p in root.iterdir())
    assert size < 8 * 2 ** 20
    meta = json.loads((root / "config.json").read_text())
    assert meta["config"]["clip_denoised"] is True and meta["config"]["clip_range"] == [-1.0, 1.0]
    assert meta["config"]["tokenizer"] == "pixels" and meta["config"]["class_num"] == 10
    assert {"cfg", "num_iter", "temperature"} <= set(meta["sampling"])


def test_load_and_generate_grid():
    model = engine.load("digits")
    d = model.sampling_defaults
    images = engine.generate(model, list(range(10)), num_iter=d["num_iter"], cfg=d["cfg"],
                             temperature=d["temperature"], output_type="np",
                             generator=[torch.Generator().manual_seed(i) for i in range(10)])
    size = model.config.img_size
    assert images.shape == (10, size, size, 1)
    assert np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    # Digits are light strokes on a dark background.
    assert 0.05 < images.mean() < 0.6


def test_samples_are_classified_as_requested():
    from engine.builtin.evaluate import evaluate_samples, generate_digits, make_reference

    model = engine.load("digits")
    d = model.sampling_defaults
    ref = make_reference(model.config.img_size, 5)
    images, labels = generate_digits(model, 5, d["cfg"], d["num_iter"], d["temperature"], seed=0)
    result = evaluate_samples(ref, images, labels)
    assert result["accuracy"] >= MIN_ACCURACY, result


def test_sample_command_default_grid(tmp_path):
    """The README's main command: a labelled row of 0-9 holding exactly the digits that
    engine.generate gives at the same seeds (image i: seed + i) and defaults."""
    from PIL import Image

    from engine.cli import main
    from engine.images import labelled_grid

    out = tmp_path / "grid.png"
    assert main(["sample", "--out", str(out)]) == 0
    model = engine.load("digits")
    d = model.sampling_defaults
    images = engine.generate(model, list(range(10)), num_iter=d["num_iter"], cfg=d["cfg"],
                             temperature=d["temperature"], output_type="np",
                             generator=[torch.Generator().manual_seed(i) for i in range(10)])
    want = np.asarray(labelled_grid(images, list(range(10)), scale=256 // model.config.img_size))
    with Image.open(out) as im:
        got = np.asarray(im)
    assert got.shape == want.shape
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
