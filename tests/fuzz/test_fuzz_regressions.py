"""Each input a fuzzer once crashed the engine with, kept as a regression test."""
import json

import pytest

import fuzz_targets as targets
from engine.core.errors import CheckpointError


def meta(**changes):
    value = json.loads(targets._DIR_SEED[1])
    value.update(changes)
    return value


@pytest.mark.parametrize("changes, message", [
    # Crashes (TypeError: '>' between None / str and int; ValueError from dict("fast")):
    ({"version": None}, "version must be a non-negative integer, got None"),
    ({"version": "1"}, "version must be a non-negative integer, got '1'"),
    ({"version": True}, "version must be a non-negative integer"),
    ({"sampling": "fast"}, "'sampling' must be a JSON object"),
    # Engine errors before, but in Python's words ("'NoneType' object is not a mapping",
    # "unhashable type: 'list'"), not naming the field:
    ({"config": None}, "'config' must be a JSON object, got null"),
    ({"config": [1]}, "'config' must be a JSON object"),
    ({"family": 3}, "'family' must be a JSON string, got 3"),
    ({"family": ["mar"]}, "'family' must be a JSON string"),
])
def test_config_json_fields_of_the_wrong_json_type(tmp_path, changes, message):
    out = tmp_path / "m"
    out.mkdir()
    (out / "model.safetensors").write_bytes(targets._DIR_SEED[0])
    (out / "config.json").write_text(json.dumps(meta(**changes)))
    import engine

    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace("[", r"\[")):
        engine.load(out)


def test_a_config_json_that_is_a_directory(tmp_path):
    # IsADirectoryError from deep in pathlib, found probing by hand.
    import engine

    out = tmp_path / "m"
    out.mkdir()
    (out / "model.safetensors").write_bytes(targets._DIR_SEED[0])
    (out / "config.json").mkdir()
    with pytest.raises(CheckpointError, match="config.json cannot be read: Is a directory"):
        engine.load(out)
