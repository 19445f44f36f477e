"""Hostile and odd requests: JSON nesting, body size (Content-Length and chunked), long inputs
never echoed in full, 404 / 405 / 500 in the OpenAI error shape with a request id, and the
LitServe and Ray Serve adapters answering every bad body exactly as the plain server."""
import asyncio
import gzip
import json

import pytest

import engine
from engine.serving.http import create_app
from servers import Server

httpx = pytest.importorskip("httpx")
pytestmark = pytest.mark.usefixtures("one_thread")
PATH = "/v1/images/generations"


@pytest.fixture(scope="module")
def model():
    return engine.load("digits", num_sampling_steps="10")


@pytest.fixture(scope="module")
def server(model):
    srv = Server(create_app(model=model, model_name="digits", max_body_bytes=4096, warmup=False)).wait_healthy()
    yield srv
    srv.stop()


def is_openai_error(r, status, code=None):
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    assert code is None or error["code"] == code, error
    assert len(r.headers["x-request-id"]) >= 8
    return error


def test_deep_nesting_is_400_and_counted(server):
    """Was: 500 text/plain with a RecursionError in the log, counted in no metric."""
    for depth in (20, 2000):           # 2000: deeper than json.loads can recurse
        body = "[" * depth + "]" * depth
        error = is_openai_error(server.client.post(PATH, content=body, headers={"content-type": "application/json"}),
                                400)
        assert "nests deeper than 16 levels" in error["message"]
    body = json.dumps({"class_label": 1, "user": "x", "n": 1}).replace('"x"', "[" * 17 + "]" * 17)
    assert "nests deeper" in is_openai_error(server.client.post(PATH, content=body), 400)["message"]
    metrics = server.client.get("/metrics").text
    assert 'engine_http_responses_total{code="400"} 3.0' in metrics
    assert "engine_invalid_requests_total 3.0" in metrics


def test_body_size_limit_is_413(server):
    """Was: no limit (a 100 MB body was read and answered 200)."""
    big = json.dumps({"class_label": 1, "user": "x" * 5000})
    error = is_openai_error(server.client.post(PATH, content=big, headers={"content-type": "application/json"}),
                            413, "request_too_large")
    assert "larger than 4096 bytes" in error["message"]

    def chunks():                                       # no Content-Length: counted as it arrives
        yield b'{"class_label": 1, "user": "'
        for _ in range(100):
            yield b"x" * 1000
        yield b'"}'
    is_openai_error(server.client.post(PATH, content=chunks()), 413, "request_too_large")
    assert server.client.post(PATH, json={"class_label": 1, "num_iter": 1}).status_code == 200


@pytest.mark.parametrize("body", [
    {"prompt": "7" * 100_000},                  # a numeric prompt: its class would be out of range
    {"prompt": "a" * 30_000},                   # under the prompt limit: the class model refuses it
    {"prompt": "a" * 100_000},                  # over the prompt limit
    {"class_label": 1, "size": "9" * 100_000},
    {"class_label": 1, "x" * 100_000: 1},       # an unknown field with a long name
    {"class_label": 1, "cfg_schedule": "c" * 200},
])
def test_errors_never_echo_long_input(model, body):
    """Was: an error for a 100 KB prompt echoed it twice (a 200 KB error body)."""
    srv = Server(create_app(model=model, warmup=False)).wait_healthy()   # the default 1 MiB limit
    try:
        r = srv.client.post(PATH, json=body)
        error = is_openai_error(r, 400)
        assert len(r.content) < 1500, error
        field = next(k for k in body if k != "class_label")
        assert error["param"] == field or (len(field) > 100 and error["param"].startswith(field[:100])), error
    finally:
        srv.stop()


def test_compressed_bodies_are_415_and_health_answers_head(server):
    # A gzip body was a 400 about undecodable bytes; a load balancer's HEAD probe was 405.
    r = server.client.post(PATH, content=gzip.compress(b'{"class_label": 1}'), headers=GZIP)
    assert "Content-Encoding 'gzip' is not supported" in is_openai_error(r, 415, "unsupported_media_type")["message"]
    assert server.client.post(PATH, json={"class_label": 1, "num_iter": 1},
                              headers={"content-encoding": "identity"}).status_code == 200
    r = server.client.head("/health")
    assert r.status_code == 200 and r.content == b""


def test_404_405_and_500_in_the_openai_shape(server, monkeypatch):
    """Was: 404 / 405 bodies were FastAPI's {"detail": ...}; a failure was text/plain."""
    is_openai_error(server.client.get("/nope"), 404, "not_found")
    is_openai_error(server.client.get(PATH), 405, "method_not_allowed")
    is_openai_error(server.client.delete("/v1/models"), 405)

    def broken(*args, **kwargs):
        raise RuntimeError("x" * 10_000)
    monkeypatch.setattr("engine.serving.generation.to_request", broken)
    r = server.client.post(PATH, json={"class_label": 1}, headers={"x-request-id": "request-500"})
    error = is_openai_error(r, 500, "server_error")
    assert "request-500" in error["message"] and "Traceback" not in r.text and len(r.content) < 1000


# The adapters answer bad bodies as the plain server ---------------------------------------------
BAD_BODIES = [b"{not json", b"[1, 2]", b"", b"[" * 5000 + b"]" * 5000,
              json.dumps({"class_label": 1, "cfg_scale": 3}).encode(), json.dumps({"class_label": 10}).encode(),
              json.dumps({"class_label": 1, "n": 0}).encode(), json.dumps({"prompt": "a" * 40_000}).encode(),
              json.dumps({"class_label": 1, "user": "x" * 2_000_000}).encode()]
GZIP = {"content-encoding": "gzip"}      # a compressed body: 415 by name, never inflated
BAD_REQUESTS = [(b, {}) for b in BAD_BODIES] + [(gzip.compress(b'{"class_label": 1}'), GZIP)]
ADAPTER_ONLY = [(json.dumps({"class_label": 1, "stream": True}).encode(), 400, "stream")]


def plain_answers(model):
    srv = Server(create_app(model=model, warmup=False)).wait_healthy()
    try:
        return [(r.status_code, r.json()) for r in
                (srv.client.post(PATH, content=b, headers={"content-type": "application/json", **h})
                 for b, h in BAD_REQUESTS)]
    finally:
        srv.stop()


def test_litserve_answers_bad_bodies_as_the_plain_server(model):
    """Was: LitServe answered 500 to a body that is not JSON, and {"detail": ...} bodies."""
    pytest.importorskip("litserve")
    from fastapi.testclient import TestClient
    from litserve.utils import wrap_litserve_start

    from engine.serving.litserve_api import EngineLitAPI, server

    want = plain_answers(model)
    lit = server(EngineLitAPI("digits", load={"num_sampling_steps": "10"}, warmup=False), accelerator="cpu",
                 timeout=120)
    with wrap_litserve_start(lit) as lit, TestClient(lit.app) as client:
        got = [(r.status_code, r.json()) for r in
               (client.post(PATH, content=b, headers={"content-type": "application/json", **h})
                for b, h in BAD_REQUESTS)]
        assert client.post(PATH, json={"class_label": 1, "num_iter": 1}).status_code == 200
        for body, status, param in ADAPTER_ONLY:     # no event stream here: refused, not garbled
            r = client.post(PATH, content=body)
            assert r.status_code == status and r.json()["error"]["param"] == param
    assert got == want


def test_ray_serve_deployment_answers_bad_bodies_as_the_plain_server(model):
    """The deployment's HTTP entry (what Ray Serve's proxy calls), without a Ray runtime."""
    pytest.importorskip("ray.serve")
    from starlette.requests import Request as HTTPRequest

    from engine.serving.ray_serve import EngineDeployment

    want = plain_answers(model)
    replica = EngineDeployment.func_or_class("digits", load={"num_sampling_steps": "10"}, warmup=False)

    async def call(body: bytes, path=PATH, method="POST", headers=None):
        sent = False

        async def receive():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.sleep(3600)
        scope = {"type": "http", "method": method, "path": path, "query_string": b"",
                 "headers": [(b"content-length", str(len(body)).encode()),
                             *((k.encode(), v.encode()) for k, v in (headers or {}).items())],
                 "root_path": ""}
        response = await replica(HTTPRequest(scope, receive))
        return response.status_code, json.loads(response.body) if response.body else None
    async def stream(body: bytes):
        async def receive():
            await asyncio.sleep(3600)
        scope = {"type": "http", "method": "POST", "path": PATH, "query_string": b"", "root_path": "",
                 "headers": [(b"content-length", str(len(body)).encode())]}
        request = HTTPRequest(scope, receive)
        request._body = body              # what Ray Serve's proxy hands the replica
        response = await replica(request)
        assert response.media_type == "text/event-stream"
        text = b"".join([chunk async for chunk in response.body_iterator]).decode()
        return [json.loads(line[len("data: "):]) for line in text.splitlines() if line.startswith("data: ")]
    try:
        got = [asyncio.run(call(b, headers=h)) for b, h in BAD_REQUESTS]
        assert asyncio.run(call(b"", "/nope", "GET"))[0] == 404
        assert asyncio.run(call(b"", "/health", "HEAD"))[0] == 200
        # stream: true is served as engine serve streams it (server-sent events; the completed
        # image is the non-streamed one's bytes)
        request = {"class_label": 3, "seed": 4, "num_iter": 4}
        events = asyncio.run(stream(json.dumps({**request, "stream": True, "partial_images": 1}).encode()))
        assert [e["type"] for e in events] == ["image_generation.partial_image", "image_generation.completed"]
        status, plain = asyncio.run(call(json.dumps(request).encode()))
        assert status == 200 and events[-1]["b64_json"] == plain["data"][0]["b64_json"]
    finally:
        replica.scheduler.close()
    assert got == want


def test_a_burst_that_fits_the_free_slots_is_not_refused(model):
    """Was: 24 requests x 2 images against an idle server (--max-queue 16, 32 free slots) got 8
    x 429, because only the worker admitted requests, between steps. Now the first 16 take the
    32 free slots at once and the other 8 wait for room: all 24 are served."""
    srv = Server(create_app(model=model, max_queue=16, max_batch_images=32, warmup=False)).wait_healthy()
    try:
        async def burst():
            async with httpx.AsyncClient(base_url=srv.url, timeout=120) as client:
                return await asyncio.gather(*[client.post(PATH, json={"class_label": i % 10, "n": 2, "seed": i})
                                              for i in range(24)])
        codes = [r.status_code for r in asyncio.run(burst())]
        assert codes == [200] * 24, codes
    finally:
        srv.stop()
