"""Fuzzing the HTTP request body of `engine serve` with hypothesis against a real server on a
loopback port (a class-conditional masked model and a discrete AR one): the known fields with
arbitrary JSON values, unknown fields, non-object JSON and raw bytes. Every answer is 200 with
decodable PNGs, or an error in the OpenAI shape (400 / 413 / 429) — never a 500, a hang or a
body that echoes unbounded input."""
import base64
import io
import json
import os
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st
from PIL import Image

import engine

pytest.importorskip("fastapi")
from engine.serving.http import create_app  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serving"))   # the serving tests' helper
from servers import Server  # noqa: E402

EXAMPLES = int(os.environ.get("ENGINE_FUZZ_EXAMPLES", "50"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
PATH = "/v1/images/generations"
FIELDS = ["prompt", "class_label", "n", "response_format", "output_format", "size", "model", "user",
          "stream", "partial_images", "seed", "num_iter", "cfg", "cfg_schedule", "temperature", "timeout",
          "priority", "quality", "background", "output_compression", "top_k", "top_p", "fast"]

scalars = (st.none() | st.booleans() | st.integers(-3, 12) | st.integers(-2 ** 70, 2 ** 70)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20)
           | st.sampled_from(["b64_json", "png", "8x8", "32x32", "auto", "linear", "bogus", "x" * 3000, "disa",
                              "disa+lazy", "speculative", "exact"]))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)


@st.composite
def bodies(draw):
    kind = draw(st.sampled_from(["fields", "fields", "fields", "json", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "json":
        return json.dumps(draw(json_values)).encode()
    body = {"class_label": draw(st.integers(0, 9)), "n": 1}
    for name in draw(st.lists(st.sampled_from(FIELDS + ["unknown_field"]), max_size=4, unique=True)):
        body[name] = draw(json_values)
    if draw(st.booleans()):
        body.pop("class_label")
    return json.dumps(body).encode()


def _server(name):
    model = engine.load(name, **({"num_sampling_steps": "5"} if name == "digits" else {}))
    return Server(create_app(model=model, model_name=name, max_body_bytes=16384, warmup=False)).wait_healthy()


@pytest.fixture(scope="module", params=["digits", "digits-elm-ar"])
def server(request):
    srv = _server(request.param)
    yield srv
    srv.stop()


def check_answer(response, body: bytes):
    assert response.status_code != 500, response.text
    if response.status_code == 200:
        event("generated")
        kind = response.headers["content-type"]
        if kind.startswith("text/event-stream"):
            assert "image_generation.completed" in response.text
            return
        data = response.json()["data"]
        assert data
        for item in data:
            Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).verify()
        return
    event(f"refused {response.status_code}")
    assert response.status_code in (400, 413, 429), (response.status_code, response.text)
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert len(response.content) < 2000 + len(body) // 100, "the error echoes the input"


@FUZZ
@given(body=bodies())
def test_request_bodies(server, body):
    response = server.client.post(PATH, content=body, headers={"content-type": "application/json"},
                                  timeout=60)
    check_answer(response, body)
