"""The quality report: Fréchet distance, the digit classifier, every available backend against the
reference at a fixed seed, and the `evaluate` command."""
import json

import numpy as np
import pytest
import torch

import engine
from engine.backends import available_backends
from engine.builtin.digits import load_split
from engine.builtin.evaluate import (classify, evaluate_samples, frechet_distance, generate_digits,
                             load_classifier, make_reference)

PER_CLASS = 5      # 50 samples per backend: a few seconds each on CPU
SEED = 0


def test_frechet_distance_known_values():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shifted = a + np.array([1.0, 2.0, 0.0])
    assert frechet_distance(a, shifted) == pytest.approx(5.0, abs=1e-6)
    # N(0, I) vs N(0, 4I) in 3-d: 3 * (1 + 4 - 2*2) = 3.
    b = rng.normal(size=(200000, 3)) * 2.0
    c = rng.normal(size=(200000, 3))
    assert frechet_distance(c, b) == pytest.approx(3.0, rel=0.03)


@pytest.fixture(scope="module")
def model():
    return engine.load("digits", backend="reference")


@pytest.fixture(scope="module")
def reference(model):
    return make_reference(model.config.img_size, PER_CLASS, seed=SEED)


def test_classifier_is_accurate_on_held_out_real_digits(model):
    clf, info = load_classifier(model.config.img_size)
    images, labels = load_split("heldout", model.config.img_size)
    pred, feats = classify(clf, images)
    accuracy = float((pred == labels).float().mean())
    assert accuracy >= 0.96
    assert info["heldout_accuracy"] == pytest.approx(accuracy)
    assert feats.shape == (len(labels), 64)


def test_classifier_does_not_depend_on_the_callers_threads():
    from engine.builtin.evaluate import train_classifier

    before = torch.get_num_threads()
    try:
        weights = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            weights.append(train_classifier(8, epochs=1).state_dict())
            assert torch.get_num_threads() == threads  # restored
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_real_vs_real_floor_is_small(reference):
    assert reference.real_vs_real_accuracy >= 0.9
    assert reference.floor_count == 10 * PER_CLASS
    assert np.isfinite(reference.real_vs_real_fd) and reference.real_vs_real_fd > 0


_reference_runs = {}


def _reference_run(model, reference, num_iter, per_class=PER_CLASS):
    """Reference-backend samples and their quality at the model's defaults except `num_iter`."""
    key = (num_iter, per_class)
    if key not in _reference_runs:
        d = model.sampling_defaults
        images, labels = generate_digits(model, per_class, d["cfg"], num_iter, d.get("temperature", 1.0), SEED)
        _reference_runs[key] = images, evaluate_samples(reference, images, labels)
    return _reference_runs[key]


@pytest.fixture(scope="module")
def reference_quality(model, reference):
    return _reference_run(model, reference, model.sampling_defaults["num_iter"])[1]


def test_reference_backend_quality(reference, reference_quality):
    assert reference_quality["accuracy"] >= 0.8, reference_quality
    assert reference_quality["fd"] < 5 * reference.real_vs_real_fd, reference_quality


def test_noise_images_are_rejected(reference):
    """What a broken kernel would produce scores far from the trained model (the check below has teeth)."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(10).repeat_interleave(PER_CLASS)
    noise = evaluate_samples(reference, torch.rand(len(labels), 1, reference.size, reference.size,
                                                   generator=gen) * 2 - 1, labels)
    assert noise["accuracy"] < 0.4
    assert noise["fd"] > 5 * reference.real_vs_real_fd


# Triton on CPU runs in Triton's interpreter (conftest sets TRITON_INTERPRET=1), ~100x slower than
# eager: it samples with 4 mask steps instead of the default 8 and 2 digits per class instead of
# 5 (fewer launches and programs, same kernels); its float32 images must still equal the
# reference backend's at the same draws, the strongest of the checks below.
INTERPRETED_NUM_ITER = 4
INTERPRETED_PER_CLASS = 2


def _backend_cases():
    """(device, backend, precision, num_iter or None for the model's default, per class)."""
    cpu = available_backends("cpu")
    cases = [("cpu", b, "fp32", None, PER_CLASS) for b in cpu if b != "reference"]
    cases += [("cpu", b, "bf16", None, PER_CLASS) for b in cpu]
    if "triton" in available_backends("cpu", include_interpreted=True):
        cases.append(("cpu", "triton", "fp32", INTERPRETED_NUM_ITER, INTERPRETED_PER_CLASS))
    if torch.cuda.is_available():
        cases += [("cuda", b, p, None, PER_CLASS) for b in available_backends("cuda") for p in ("fp32", "bf16")]
    return cases


@pytest.mark.parametrize("device,backend,precision,num_iter,per_class", _backend_cases())
def test_backend_matches_reference_quality(device, backend, precision, num_iter, per_class, model, reference):
    """Same seed, settings and sample count: each backend's samples, at each precision, score
    like the float32 reference backend's on CPU."""
    d = model.sampling_defaults
    num_iter = num_iter or d["num_iter"]
    want_images, want = _reference_run(model, reference, num_iter, per_class)
    other = engine.load("digits", backend=backend, device=device, precision=precision)
    images, labels = generate_digits(other, per_class, d["cfg"], num_iter, d.get("temperature", 1.0), SEED)
    quality = evaluate_samples(reference, images, labels)
    # With 50 samples the accuracy's binomial noise is a few points; FD noise is tens of percent.
    assert abs(quality["accuracy"] - want["accuracy"]) <= 0.12, (quality, want)
    assert quality["fd"] <= 1.5 * want["fd"] + reference.real_vs_real_fd, (quality, want)
    assert quality["accuracy"] >= 0.8
    if device == "cpu" and precision == "fp32":
        # The same random draws give the same digits, not just similar ones.
        assert (images - want_images).abs().max() < 1e-3


def test_evaluate_command_writes_report(tmp_path):
    from engine.cli import main

    png, js = tmp_path / "report.png", tmp_path / "report.json"
    assert main(["evaluate", "--samples-per-class", "2", "--cfg", "1", "3", "--num-iter", "4",
                 "--backends", "reference", "--out", str(png), "--json", str(js)]) == 0
    report = json.loads(js.read_text())
    assert [(r["cfg"], r["num_iter"], r["backend"]) for r in report["results"]] == \
        [(1.0, 4, "reference"), (3.0, 4, "reference")]
    for r in report["results"]:
        assert len(r["per_class"]) == 10 and 0 <= r["accuracy"] <= 1 and np.isfinite(r["fd"])
        assert r["count"] == 20
    assert report["classifier"]["heldout_accuracy"] >= 0.96
    assert np.isfinite(report["real_vs_real_fd"])
    assert png.exists() and png.stat().st_size > 1000


def test_evaluate_command_reduced_precision(tmp_path):
    from engine.cli import main

    js = tmp_path / "report.json"
    assert main(["evaluate", "--samples-per-class", "2", "--cfg", "2", "--backends", "reference",
                 "--precision", "bf16", "--out", "", "--json", str(js)]) == 0
    report = json.loads(js.read_text())
    assert report["precision"] == "bf16"
    assert [r["backend"] for r in report["results"]] == ["reference-bf16"]
