"""Fuzzing the checkpoint readers (published .pth, engine directories and their config.json,
BAE and VAE files, convert) with hypothesis: mutated bytes of small valid files, and arbitrary
JSON in config.json. A result or an engine error, never another exception, a hang, a NaN or a
partial directory. ENGINE_FUZZ_EXAMPLES scales every test (CI: the default; by hand: thousands)."""
import json
import os

import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import fuzz_targets as targets

EXAMPLES = int(os.environ.get("ENGINE_FUZZ_EXAMPLES", "50"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


@st.composite
def mutated(draw, seed: bytes):
    """`seed` with a few byte edits: overwrites, truncation, insertions, deletions, zeroed runs."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["set", "truncate", "insert", "delete", "zero", "header"]))
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        if kind == "header":   # where the formats keep their structure (zip / safetensors header)
            at = draw(st.integers(0, min(len(data) - 1, 200)))
            kind = "set"
        if kind == "set":
            data[at] = draw(st.integers(0, 255))
        elif kind == "truncate":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[at:at + draw(st.integers(1, 64))]
        else:
            data[at:at + draw(st.integers(1, 512))] = bytes(min(512, len(data) - at))
    return bytes(data)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)


@FUZZ
@given(st.data())
def test_published_checkpoints_of_every_family(data):
    name = data.draw(st.sampled_from(["mar.pth", "elm.pth", "fluid.pth"]))
    extra = {"family": "elm-ar", **targets.ELM_C} if name == "elm.pth" else {}
    targets.load_file_bytes(data.draw(mutated(targets.seed_bytes(name))), "checkpoint.pth", **extra)


@FUZZ
@given(st.data())
def test_engine_directories(data):
    weights, config = targets._DIR_SEED
    if data.draw(st.booleans()):
        weights = data.draw(mutated(weights))
    else:
        config = data.draw(mutated(config))
    targets.load_engine_dir_bytes(weights, config)


@FUZZ
@given(st.data())
def test_config_json_fields(data):
    meta = json.loads(targets._DIR_SEED[1])
    for _ in range(data.draw(st.integers(1, 3))):
        where = data.draw(st.sampled_from(["top", "config"]))
        table = meta if where == "top" else meta.get("config")
        if not isinstance(table, dict):
            continue
        key = data.draw(st.sampled_from(sorted(table) + ["extra"]))
        if data.draw(st.integers(0, 4)) == 0:
            table.pop(key, None)
        else:
            table[key] = data.draw(json_values)
    targets.load_engine_dir_config(meta)


@FUZZ
@given(st.data())
def test_bae_files(data):
    suffix = data.draw(st.sampled_from([".safetensors", ".th"]))
    seed = targets.seed_bytes("bae.safetensors") if suffix == ".safetensors" else \
        (targets.DATA / "elm" / "binaryae_ema.th").read_bytes()
    targets.load_bae_bytes(data.draw(mutated(seed)), suffix)


@FUZZ
@given(st.dictionaries(st.sampled_from(["decoder.conv_in.weight", "post_quant_conv.weight", "model",
                                        "state_dict", "decoder.x", "encoder.y"]),
                       st.sampled_from([torch.zeros(2), torch.zeros(3, 3, dtype=torch.int8), "text", 3,
                                        {"decoder.conv_in.weight": torch.zeros(1)}, None,
                                        torch.full((2,), float("nan"))]), max_size=4))
def test_vae_files(state):
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    targets.load_vae_bytes(buffer.getvalue())


@FUZZ
@given(st.data())
def test_convert_leaves_nothing_partial(data):
    blob = data.draw(mutated(targets.seed_bytes("mar.pth"))) if data.draw(st.booleans()) \
        else targets.seed_bytes("mar.pth")
    targets.convert_bytes(blob, "checkpoint.pth", existing=data.draw(st.booleans()),
                          force=data.draw(st.booleans()))
