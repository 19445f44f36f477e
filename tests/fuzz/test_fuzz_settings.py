"""Fuzzing every family's sampling arguments (engine.generate on each built-in model) with
hypothesis: mixtures of valid values, edge values and wrong types. The result is a finite image
in [0, 1] of the model's shape, or an engine error naming an argument."""
import functools
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings, strategies as st

import engine
from engine.core.errors import EngineError
from engine.loading import BUILTIN_MODELS
from fuzz_targets import no_hang

EXAMPLES = int(os.environ.get("ENGINE_FUZZ_EXAMPLES", "50"))
FUZZ = settings(max_examples=max(6, EXAMPLES // 2), deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
ARGUMENTS = ("num_iter", "cfg", "cfg_schedule", "temperature", "top_k", "top_p", "height", "width")

odd = st.sampled_from([None, True, "x", "", float("nan"), float("inf"), -float("inf"), 1e39, -1e39, 0,
                       -1, 2 ** 63, [], [1], (1, 2), (1, 2, 3), {"a": 1}, b"1", object()])
numbers = st.floats(-3, 6, allow_nan=False) | st.integers(-2, 20) | st.sampled_from([np.float32(1.5), np.int64(2),
                                                                                    torch.tensor(1.0)])
counts = st.integers(-2, 20) | st.sampled_from([np.int64(4), 16, 10 ** 12])
values = {
    "num_iter": counts | odd,
    "cfg": numbers | st.tuples(numbers, numbers) | odd,
    "cfg_schedule": st.sampled_from(["linear", "constant", "cos", "log", "square", "square_root", "bogus"]) | odd,
    "temperature": numbers | st.tuples(numbers, numbers) | odd,
    "top_k": st.none() | counts | st.tuples(counts, counts) | odd,
    "top_p": st.none() | st.floats(-0.5, 1.5, allow_nan=False) | st.tuples(st.floats(0, 1), st.floats(0, 1)) | odd,
    "height": st.sampled_from([16, 32, 48, 64, 17, 0, -16, 10 ** 6]) | odd,
    "width": st.sampled_from([16, 32, 48, 64, 17, 0, -16, 10 ** 6]) | odd,
}


@functools.lru_cache(maxsize=None)
def model(name):
    return engine.load(name)


@st.composite
def calls(draw):
    chosen = draw(st.lists(st.sampled_from(ARGUMENTS), max_size=3, unique=True))
    return {name: draw(values[name]) for name in chosen}


def check_call(name, kwargs):
    m = model(name)
    base = {"prompts": ["a 3"]} if m.conditioning == "text" else {"labels": [3]}
    with no_hang():
        try:
            images = engine.generate(m, generator=torch.Generator().manual_seed(0), output_type="pt",
                                     **base, **kwargs)
        except EngineError as err:
            message = str(err)
            assert any(arg in message for arg in kwargs) or "model" in message, (kwargs, message)
            event("refused")
            return
    event("sampled")
    assert images.ndim == 4 and images.shape[0] == 1, images.shape
    assert bool(torch.isfinite(images).all()) and float(images.min()) >= 0 and float(images.max()) <= 1


@pytest.mark.parametrize("name", sorted(BUILTIN_MODELS))
@FUZZ
@given(kwargs=calls())
def test_every_familys_settings(name, kwargs):
    check_call(name, kwargs)
