"""What the fuzzers feed: each target takes bytes (or values) and runs one of the engine's input
boundaries on them. The property every target keeps: a result, or an engine error (EngineError,
or argparse's exit 2 on the command line), never another exception, a hang, a NaN or a partial
file. Shared by the hypothesis tests and the atheris harness (atheris_readers.py)."""
from __future__ import annotations

import json
import shutil
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

import engine
from engine.core.errors import EngineError

DATA = Path(__file__).resolve().parents[1] / "data"
GOLDEN = Path(__file__).resolve().parents[2].parent / "shared" / "golden"
SEEDS = {   # small valid files whose bytes the fuzzers mutate
    "mar.pth": DATA / "published" / "ck_buf1.pth",
    "elm.pth": DATA / "elm" / "ck_c.pth",
    "fluid.pth": DATA / "lightgen" / "ck_uneq.pth",
    "bae.safetensors": DATA / "elm" / "bae.safetensors",
}
ELM_C = {"n_head": 2}   # what ck_c's bare state dict does not record (tests/data/elm/runs.json)
HANG_SECONDS = 60


class Hang(AssertionError):
    """A target ran past HANG_SECONDS."""


@contextmanager
def no_hang(seconds: int = HANG_SECONDS):
    def fail(*_):
        raise Hang(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def seed_bytes(name: str) -> bytes:
    return SEEDS[name].read_bytes()


def engine_dir_seed() -> tuple[bytes, bytes]:
    """(model.safetensors, config.json) of a small engine directory (a converted MAR)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = engine.convert(SEEDS["mar.pth"], Path(tmp) / "m")
        return (out / "model.safetensors").read_bytes(), (out / "config.json").read_bytes()


def check_model(model) -> None:
    """A loaded model's weights are finite (a loader never hands out NaN weights)."""
    for key, value in model.state_dict().items():
        if value.is_floating_point():
            assert bool(torch.isfinite(value).all()), f"{key} holds non-finite values after a load"


def expect_engine_error(run) -> object:
    """run() -> its result, or None after an EngineError; anything else propagates (a finding)."""
    with no_hang():
        try:
            return run()
        except EngineError as err:
            assert str(err).strip(), "an engine error without a message"
            return None


def load_file_bytes(data: bytes, name: str, **kwargs):
    """engine.load of `data` written as file `name` (a published checkpoint)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        model = expect_engine_error(lambda: engine.load(path, **kwargs))
        if model is not None:
            check_model(model)
        return model


def load_engine_dir_bytes(weights: bytes, config: bytes):
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "m"
        out.mkdir()
        (out / "model.safetensors").write_bytes(weights)
        (out / "config.json").write_bytes(config)
        model = expect_engine_error(lambda: engine.load(out))
        if model is not None:
            check_model(model)
        return model


def load_engine_dir_config(meta) -> object:
    """An engine directory whose config.json is `meta` (any JSON value) beside valid weights."""
    weights, _ = _DIR_SEED
    return load_engine_dir_bytes(weights, json.dumps(meta).encode())


def load_bae_bytes(data: bytes, suffix: str):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"bae{suffix}"
        path.write_bytes(data)
        decoder = expect_engine_error(lambda: engine.load_bae(path))
        if decoder is not None:
            for key, value in decoder.state_dict().items():
                assert bool(torch.isfinite(value).all()), key
        return decoder


def load_vae_bytes(data: bytes):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kl16.ckpt"
        path.write_bytes(data)
        return expect_engine_error(lambda: engine.load_vae(path))


def convert_bytes(data: bytes, name: str, existing: bool, force: bool):
    """engine.convert of `data` into a new (or existing) directory: OUT is left untouched on an
    error, complete on success, and nothing else is left beside it."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / name
        src.write_bytes(data)
        (tmp / "parent").mkdir()
        out = tmp / "parent" / "out"
        if existing:
            out.mkdir()
            (out / "mine.txt").write_text("keep")
        result = expect_engine_error(lambda: engine.convert(src, out, force=force))
        left = sorted(p.name for p in (tmp / "parent").iterdir())
        assert left == (["out"] if existing or result is not None else []), left
        if result is None and existing:
            assert (out / "mine.txt").read_text() == "keep"
        if result is not None:
            assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
            check_model(engine.load(out))
        shutil.rmtree(tmp / "parent")
        return result


_DIR_SEED = engine_dir_seed()
