"""The sampling fields a family takes beyond MAR's (top_k / top_p of the categorical families)
through the HTTP body: the served image equals engine.generate's with the same settings; a model
that does not take a field refuses it with 400 naming it; the OpenAPI document lists a field only
for the models that take it."""
import base64
import io

import numpy as np
import pytest
import torch

import engine
from engine.serving.http import create_app
from servers import Server

pytest.importorskip("fastapi")
pytestmark = pytest.mark.usefixtures("one_thread")
PATH = "/v1/images/generations"


@pytest.fixture(scope="module")
def servers():
    made = {name: (engine.load(name), None) for name in ("digits-elm-ar", "digits")}
    made = {name: (m, Server(create_app(model=m, model_name=name, warmup=False)).wait_healthy())
            for name, (m, _) in made.items()}
    yield made
    for _, srv in made.values():
        srv.stop()


def pixels(b64: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64)))).astype(int)


@pytest.mark.parametrize("fields", [{"top_k": 2}, {"top_p": 0.6}, {"top_k": 3, "top_p": 0.9, "temperature": 0.8}])
def test_top_k_top_p_are_served_as_engine_generate_samples_them(servers, fields):
    model, srv = servers["digits-elm-ar"]
    r = srv.client.post(PATH, json={"class_label": 4, "seed": 11, **fields})
    assert r.status_code == 200, r.text
    assert {k: r.json()["settings"][k] for k in fields} == fields
    want = engine.generate(model, [4], generator=[torch.Generator().manual_seed(11)], output_type="pil", **fields)[0]
    assert np.array_equal(pixels(r.json()["data"][0]["b64_json"]), np.asarray(want).astype(int))
    exact = srv.client.post(PATH, json={"class_label": 4, "seed": 11})
    assert exact.json()["data"][0]["b64_json"] != r.json()["data"][0]["b64_json"]


@pytest.mark.parametrize("fields,param", [({"top_k": 0}, "top_k"), ({"top_p": 1.5}, "top_p"),
                                          ({"top_k": "2"}, "top_k"), ({"top_p": True}, "top_p")])
def test_bad_values_are_400_naming_the_field(servers, fields, param):
    _, srv = servers["digits-elm-ar"]
    r = srv.client.post(PATH, json={"class_label": 4, **fields})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_a_model_without_the_setting_refuses_it_and_its_document_omits_it(servers):
    _, srv = servers["digits"]
    r = srv.client.post(PATH, json={"class_label": 4, "top_k": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_k", r.text
    assert "top_k is not a setting of this model" in r.json()["error"]["message"]
    props = srv.client.get("/openapi.json").json()["components"]["schemas"]["ImageGenerationRequest"]["properties"]
    assert "top_k" not in props and "top_p" not in props
    _, srv = servers["digits-elm-ar"]
    props = srv.client.get("/openapi.json").json()["components"]["schemas"]["ImageGenerationRequest"]["properties"]
    assert props["top_k"]["anyOf"][0]["minimum"] == 1 and props["top_p"]["anyOf"][0]["maximum"] == 1


def test_fast_disa_is_served_as_engine_generate_samples_it(servers):
    model, srv = servers["digits"]
    r = srv.client.post(PATH, json={"class_label": 5, "seed": 3, "fast": "disa"})
    assert r.status_code == 200, r.text
    want = engine.generate(model, [5], generator=[torch.Generator().manual_seed(3)], output_type="pil", fast="disa")[0]
    assert np.abs(pixels(r.json()["data"][0]["b64_json"]) - np.asarray(want).astype(int)).max() <= 1
    exact = srv.client.post(PATH, json={"class_label": 5, "seed": 3})
    assert np.abs(pixels(exact.json()["data"][0]["b64_json"]) - np.asarray(want).astype(int)).max() > 1
    r = srv.client.post(PATH, json={"class_label": 5, "seed": 3, "fast": {"disa": {"lower": 3}}})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("name,fast,message", [
    ("digits", "bogus", "fast"), ("digits", {"disa": {"lower": -1}}, "lower"),
    ("digits", "speculative", "speculative"), ("digits-elm-ar", "disa", "disa"),
    ("digits", 3, "fast"), ("digits", "lazy", "lazy")])
def test_bad_or_unavailable_fast_modes_are_400_naming_fast(servers, name, fast, message):
    _, srv = servers[name]
    r = srv.client.post(PATH, json={"class_label": 5, "fast": fast})
    assert r.status_code == 400 and r.json()["error"]["param"] == "fast", r.text
    assert message in r.json()["error"]["message"]
