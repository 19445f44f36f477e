"""Operating the service: API keys (--api-key, ENGINE_API_KEYS), X-Request-ID and the JSON access
log, priorities over HTTP, graceful drain on SIGTERM (a real `engine serve` process), and the
LitServe launcher leaving no worker process behind on SIGTERM."""
import json
import logging
import signal
import threading
import time

import pytest

import engine
from engine.serving.http import create_app
from servers import Child, Server, alive, free_port

httpx = pytest.importorskip("httpx")
pytestmark = pytest.mark.usefixtures("one_thread")
PATH = "/v1/images/generations"


@pytest.fixture(scope="module")
def model():
    return engine.load("digits", num_sampling_steps="10")


def test_api_keys(model):
    """Was: any key (or none) was accepted. /health and /metrics stay open for probes."""
    srv = Server(create_app(model=model, api_keys=["key-a", "key-b"], warmup=False)).wait_healthy()
    try:
        body = {"class_label": 1, "num_iter": 1}
        for headers, status in (({}, 401), ({"authorization": "Bearer nope"}, 401),
                                ({"authorization": "Basic key-a"}, 401), ({"authorization": "Bearer key-a"}, 200),
                                ({"authorization": "Bearer key-b"}, 200)):
            r = srv.client.post(PATH, json=body, headers=headers)
            assert r.status_code == status, (headers, r.text)
            if status == 401:
                assert r.json()["error"]["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
        assert srv.client.get("/v1/models").status_code == 401
        assert srv.client.get("/health").status_code == 200 and srv.client.get("/metrics").status_code == 200
    finally:
        srv.stop()


def test_api_keys_from_the_command_line_and_environment(monkeypatch):
    from engine.core.errors import EngineError
    from engine.serving.command import api_keys_of

    monkeypatch.setenv("ENGINE_API_KEYS", " k2 , k3,")
    assert api_keys_of(["k1"]) == ["k1", "k2", "k3"]
    with pytest.raises(EngineError, match="non-empty"):
        api_keys_of([" "])


def test_request_id_is_taken_or_made_and_logged(model, caplog):
    srv = Server(create_app(model=model, warmup=False)).wait_healthy()
    try:
        with caplog.at_level(logging.INFO, logger="engine.serving.access"):
            given = srv.client.post(PATH, json={"class_label": 2, "num_iter": 1}, headers={"x-request-id": "abc-123"})
            made = srv.client.post(PATH, json={"class_label": 10})
            bad = srv.client.get("/health", headers={"x-request-id": "x" * 500})
        assert given.status_code == 200 and given.headers["x-request-id"] == "abc-123"
        assert made.status_code == 400 and len(made.headers["x-request-id"]) == 32
        assert len(bad.headers["x-request-id"]) == 32           # too long: replaced
        lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "engine.serving.access"]
        by_id = {line["request_id"]: line for line in lines}
        assert by_id["abc-123"]["status"] == 200 and by_id["abc-123"]["path"] == PATH
        assert by_id[made.headers["x-request-id"]]["status"] == 400
        assert {"time", "method", "duration_ms", "client", "bytes"} <= set(by_id["abc-123"])
    finally:
        srv.stop()


def test_priority_over_http(model, monkeypatch):
    from engine.model import MaskedBatcher

    entered, release, order = threading.Event(), threading.Event(), []
    real = MaskedBatcher.step

    def step(batcher, images):
        entered.set()
        assert release.wait(30)
        return real(batcher, images)
    monkeypatch.setattr(MaskedBatcher, "step", step)
    srv = Server(create_app(model=model, max_batch_images=1, warmup=False)).wait_healthy()
    try:
        def post(priority):
            r = srv.client.post(PATH, json={"class_label": 1, "num_iter": 1, "priority": priority})
            order.append((priority, r.status_code))
        first = threading.Thread(target=post, args=(0,))
        first.start()
        assert entered.wait(30)
        threads = []
        for p in (-3, 9, 4):
            threads.append(threading.Thread(target=post, args=(p,)))
            threads[-1].start()
            deadline = time.monotonic() + 30
            while srv.scheduler.queue_depth < len(threads):
                assert time.monotonic() < deadline
                time.sleep(0.01)
        release.set()
        for t in [first, *threads]:
            t.join(60)
        assert order == [(0, 200), (9, 200), (4, 200), (-3, 200)]
        r = srv.client.post(PATH, json={"class_label": 1, "priority": 5000})
        assert r.status_code == 400 and r.json()["error"]["param"] == "priority"
    finally:
        release.set()
        srv.stop()


def serve_child(tmp_path, *extra, env=None):
    port = free_port()
    args = ["engine", "serve", "--checkpoint", "digits", "--port", str(port), "--threads", "1",
            "--max-batch-images", "1", "--log-level", "info", *extra]
    return Child(args, port, tmp_path, env=env)


def test_sigterm_drains(tmp_path):
    """Was: on SIGTERM the listener closed at once (refused connections, not 503). Now: /health
    503 "draining", new requests 503 + Retry-After, the admitted requests finish, exit 0."""
    server = serve_child(tmp_path, "--drain-timeout", "60", env={"ENGINE_API_KEYS": "secret"}).wait_healthy()
    auth = {"authorization": "Bearer secret"}
    try:
        answers = []

        def long_request(label):    # label 3 streams: an event stream in flight finishes too
            stream = {"stream": True, "partial_images": 1} if label == 3 else {}
            answers.append(httpx.post(server.url + PATH, headers=auth, timeout=120,
                                      json={"class_label": label, "n": 8, "num_iter": 16, "seed": label, **stream}))
        threads = [threading.Thread(target=long_request, args=(k,)) for k in (1, 2, 3)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while True:     # all admitted: one image in flight, the requests wait for room (n > free slots)
            metrics = httpx.get(server.url + "/metrics").text
            if "engine_images_in_flight 1.0" in metrics and "engine_queue_depth 3.0" in metrics:
                break
            assert time.monotonic() < deadline, server.output()
            time.sleep(0.02)
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        health = httpx.get(server.url + "/health", timeout=10)
        assert health.status_code == 503 and health.json()["status"] == "draining", health.text
        refused = httpx.post(server.url + PATH, headers=auth, json={"class_label": 3, "num_iter": 1}, timeout=10)
        assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["code"] == "server_draining"
        for t in threads:
            t.join(120)
        assert [r.status_code for r in answers] == [200, 200, 200], [r.text[:300] for r in answers]
        streamed = [r for r in answers if r.headers["content-type"].startswith("text/event-stream")]
        assert len(streamed) == 1 and streamed[0].text.count("event: image_generation.completed") == 8
        assert all(len(r.json()["data"]) == 8 for r in answers if r not in streamed)
        assert server.proc.wait(30) == 0, server.output()
        access = [json.loads(line) for line in server.output().splitlines() if line.startswith('{"time"')]
        assert {line["status"] for line in access} >= {200, 503}
    finally:
        server.stop()


def test_sigterm_drain_timeout(tmp_path):
    """Past --drain-timeout the server exits anyway; what is left gets 503 or a closed connection."""
    server = serve_child(tmp_path, "--drain-timeout", "0.5").wait_healthy()
    try:
        answers = []
        thread = threading.Thread(target=lambda: answers.append(httpx.post(
            server.url + PATH, json={"class_label": 1, "n": 16, "num_iter": 16}, timeout=120)))
        thread.start()
        deadline = time.monotonic() + 30
        while "engine_images_in_flight 1.0" not in httpx.get(server.url + "/metrics").text:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        start = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(30) == 0, server.output()
        assert time.monotonic() - start < 10
        thread.join(30)
    except httpx.TransportError:
        pass
    finally:
        server.stop()
    assert not answers or answers[0].status_code == 503


def test_litserve_launcher_sigterm_leaves_no_worker(tmp_path):
    """Was: SIGTERM to the launcher left its worker processes serving."""
    pytest.importorskip("litserve")
    port = free_port()
    server = Child(["engine.serving.litserve_api", "--checkpoint", "digits", "--steps", "10", "--port", str(port),
                    "--no-warmup"], port, tmp_path).wait_healthy(timeout=180)
    try:
        r = httpx.post(server.url + PATH, content=b"{not json", timeout=60)
        assert r.status_code == 400 and r.json()["error"]["message"].startswith("the body must be a JSON object")
        workers = server.descendants()
        assert len(workers) >= 2, server.output()
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(60)
        deadline = time.monotonic() + 30
        while any(alive(pid) for pid in workers):
            assert time.monotonic() < deadline, [pid for pid in workers if alive(pid)]
            time.sleep(0.1)
    finally:
        server.stop()
