"""engine.serving: the iteration-level Scheduler (invariant, cancellation, deadlines, bounded
queue, no lost request), the HTTP service (every endpoint, every malformed input, overload,
client disconnect), the `serve` command and the LitServe / Ray Serve adapters.

All on the built-in digits model with 10 diffusion steps and few MAR steps (seconds each)."""
import asyncio
import base64
import io
import random
import threading
import time

import numpy as np
import pytest
import torch

import engine
from engine.serving import (DeadlineExceeded, QueueFullError, Request, RequestError, Scheduler,
                            SchedulerClosed)
from engine.model import MaskedBatcher
from helpers import rel_err
from servers import Gate, Server

httpx = pytest.importorskip("httpx")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return engine.load("digits", num_sampling_steps="10")


def gen(model, label, seed, output_type="np", **settings):
    return engine.generate(model, [label], generator=[torch.Generator().manual_seed(seed)],
                           output_type=output_type, **settings)


def settings_of(r: Request) -> dict:
    return dict(num_iter=r.num_iter, cfg=r.cfg, cfg_schedule=r.cfg_schedule, temperature=r.temperature)




@pytest.fixture
def slow_steps(monkeypatch):
    """Every MAR step of the scheduler takes at least 20 ms, so a request of tens of steps
    outlasts a test's sub-second deadline or cancel on any machine (a fast CPU finished 4 x 16
    digits steps inside 0.3 s)."""
    real = MaskedBatcher.step

    def step(batcher, images):
        time.sleep(0.02)
        return real(batcher, images)
    monkeypatch.setattr(MaskedBatcher, "step", step)


# The scheduler ---------------------------------------------------------------------------------
def test_invariant_with_mixed_concurrent_requests(model):
    """18 requests (labels, num_iter, cfg, schedule, temperature, n) from 6 threads, at most 8
    images in flight: every image equals engine.generate with its own generator seed + i."""
    rng = random.Random(0)
    requests = [Request(label=rng.randrange(10), n=rng.choice([1, 1, 2, 3]), num_iter=rng.choice([1, 2, 3, 5]),
                        cfg=rng.choice([1.0, 2.0, 3.5]), cfg_schedule=rng.choice(["linear", "constant"]),
                        temperature=rng.choice([0.8, 1.0, 1.2]), seed=rng.randrange(10 ** 6))
                for _ in range(18)]
    steps = []
    futures = [None] * len(requests)
    with Scheduler(model, max_batch_images=8) as sched:
        sched.add_step_listener(lambda seconds, images, rows, groups: steps.append(images))

        def client(k):
            for i in range(k, len(requests), 6):
                futures[i] = sched.submit(requests[i])
                time.sleep(0.002 * (i % 3))
        threads = [threading.Thread(target=client, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        results = [f.result(120) for f in futures]
    assert max(steps) == 8 and len(steps) < sum(r.n * r.num_iter for r in requests) / 3   # batched
    for request, result in zip(requests, results):
        assert result.request.seed == request.seed and result.tokens.shape[0] == request.n
        images = result.images("np")
        for i in range(request.n):
            want_tokens = model.sample_tokens(1, labels=[request.label],
                                              generator=[torch.Generator().manual_seed(request.seed + i)],
                                              **settings_of(request))
            assert rel_err(result.tokens[i:i + 1], want_tokens) <= 1e-4
            want = gen(model, request.label, request.seed + i, **settings_of(request))
            assert np.abs(images[i:i + 1] - want).max() <= 1e-4
    # PNG of the "pil" output: the same bytes' pixels as engine.generate's PIL image.
    from PIL import Image
    r = requests[0]
    png = np.asarray(Image.open(io.BytesIO(results[0].png()[0])))
    assert np.abs(png.astype(int) - np.asarray(gen(model, r.label, r.seed, "pil", **settings_of(r))[0]).astype(int)).max() <= 1


def test_async_submit_and_model_defaults(model):
    async def main(sched):
        return await asyncio.gather(*[sched.submit_async(Request(label=i, seed=10 + i, num_iter=2))
                                      for i in range(3)], sched.submit_async(Request(label=4)))
    with Scheduler(model) as sched:
        *fixed, default = asyncio.run(main(sched))
    for i, result in enumerate(fixed):
        assert np.abs(result.images("np") - gen(model, i, 10 + i, num_iter=2)).max() <= 1e-4
    # No settings: the model's recorded defaults, and a random seed that is returned.
    r = default.request
    assert (r.num_iter, r.cfg, r.temperature) == (8, 2.0, 1.0) and 0 <= r.seed < 2 ** 63
    assert np.abs(default.images("np") - gen(model, 4, r.seed)).max() <= 1e-4


@pytest.mark.parametrize("fields,field,message", [
    (dict(label=10), "class_label", "out of range"),
    (dict(label=-1), "class_label", "out of range"),
    (dict(label=1.5), "class_label", "must be an integer"),
    (dict(label=1, n=0), "n", "from 1 to 16"),
    (dict(label=1, n=17), "n", "from 1 to 16"),
    (dict(label=1, num_iter=0), "num_iter", "at least 1"),
    (dict(label=1, cfg=float("nan")), "cfg", "finite"),
    (dict(label=1, temperature=0.0), "temperature", "> 0"),
    (dict(label=1, cfg_schedule="cosine"), "cfg_schedule", "unknown cfg_schedule"),
    (dict(label=1, seed=-1), "seed", "[0, 9223372036854775807]"),
    (dict(label=1, seed=2 ** 63), "seed", "[0, 9223372036854775807]"),
    (dict(label=1, timeout=0), "timeout", "> 0"),
    (dict(prompt="a cat"), "prompt", "class-conditional"),
])
def test_bad_requests_name_the_field(model, fields, field, message):
    with Scheduler(model, start=False) as sched:
        with pytest.raises(RequestError, match=None) as err:
            sched.submit(Request(**fields))
    assert err.value.field == field and message in str(err.value) and str(err.value).startswith(field)


def test_cancellation_queued_and_in_flight(model):
    with Scheduler(model, max_batch_images=1) as sched:
        started = threading.Event()
        sched.add_step_listener(lambda *a: started.set())
        running = sched.submit(Request(label=1, n=3, num_iter=16, seed=0))
        queued = sched.submit(Request(label=2, seed=0, num_iter=2))
        assert started.wait(30)
        assert queued.cancel() and running.cancel()       # in flight: dropped at the next step
        after = sched.submit(Request(label=3, seed=5, num_iter=2)).result(60)
        assert running.cancelled() and queued.cancelled()
        assert sched.images_in_flight == 0 and sched.counts["cancelled"] == 2
    assert np.abs(after.images("np") - gen(model, 3, 5, num_iter=2)).max() <= 1e-4


def test_async_cancel_cancels_the_request(model, slow_steps):
    async def main(sched):
        task = asyncio.ensure_future(sched.submit_async(Request(label=1, n=4, num_iter=16)))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    with Scheduler(model, max_batch_images=1) as sched:
        asyncio.run(main(sched))
        deadline = time.monotonic() + 30
        while sched.counts["cancelled"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sched.counts["cancelled"] == 1


def test_deadlines_in_flight_and_queued(model, slow_steps):
    with Scheduler(model, max_batch_images=1) as sched:
        slow = sched.submit(Request(label=1, n=4, num_iter=16, timeout=0.3))
        waiting = sched.submit(Request(label=2, num_iter=2, timeout=0.05))
        with pytest.raises(DeadlineExceeded, match="passed its deadline"):
            slow.result(60)
        with pytest.raises(DeadlineExceeded):
            waiting.result(60)
        assert sched.counts["deadline"] == 2
        assert sched.submit(Request(label=2, num_iter=1)).result(60).tokens.shape[0] == 1


def test_queue_full_is_refused_and_nothing_is_lost(model, monkeypatch):
    gate = Gate(monkeypatch)
    with Scheduler(model, max_batch_images=1, max_queue=2) as sched:
        first = sched.submit(Request(label=0, num_iter=2))
        assert gate.entered.wait(30)                       # in flight, the worker held
        queued = [sched.submit(Request(label=i, num_iter=2)) for i in (1, 2)]
        with pytest.raises(QueueFullError, match="queue is full") as err:
            sched.submit(Request(label=3, num_iter=2))
        assert err.value.retry_after >= 1 and sched.queue_depth == 2
        gate.release.set()
        for f in [first, *queued]:
            assert f.result(60).tokens.shape[0] == 1
    assert sched.counts["rejected_full"] == 1 and sched.counts["ok"] == 3


def test_fatal_worker_crash_ends_every_request(model, monkeypatch):
    class Fatal(BaseException):
        pass
    gate = Gate(monkeypatch)
    with Scheduler(model, max_batch_images=1) as sched:
        in_flight = sched.submit(Request(label=0, num_iter=4))
        assert gate.entered.wait(30)
        queued = [sched.submit(Request(label=i, num_iter=2)) for i in (1, 2)]

        def crash():
            raise Fatal("boom")
        monkeypatch.setattr(sched, "_reap", crash)
        gate.release.set()
        for f in [in_flight, *queued]:
            with pytest.raises(SchedulerClosed, match="worker stopped"):
                f.result(60)
        with pytest.raises(SchedulerClosed, match="not taking requests"):
            sched.submit(Request(label=1))


def test_close_drains_or_cancels(model):
    sched = Scheduler(model, max_batch_images=2)
    drained = [sched.submit(Request(label=i, num_iter=2)) for i in range(3)]
    sched.close()                                              # finishes what it has
    assert all(f.result(0).tokens.shape[0] == 1 for f in drained)
    sched = Scheduler(model, max_batch_images=1)
    dropped = [sched.submit(Request(label=i, num_iter=8, n=2)) for i in range(3)]
    sched.close(cancel=True)
    for f in dropped:
        with pytest.raises(SchedulerClosed):
            f.result(5)
    with pytest.raises(SchedulerClosed):
        sched.submit(Request(label=1))


def test_text_model_requests(monkeypatch):
    """A Fluid model: prompts through a text encoder, the same invariant."""
    from engine.families.fluid import FluidModel
    from helpers import random_fluid

    fluid = FluidModel(random_fluid(0, num_sampling_steps="4"), backend="reference")
    table = torch.randn(50, 5, 12, generator=torch.Generator().manual_seed(0))

    class Encoder:
        max_length, channels = 5, 12

        def __call__(self, prompts):
            return torch.stack([table[len(p) % 50] for p in prompts])
    encoder = Encoder()
    fluid.text_encoder = encoder
    with Scheduler(fluid, max_batch_images=4) as sched:
        futures = [sched.submit(Request(prompt=p, n=2, seed=s, num_iter=3, cfg=c))
                   for p, s, c in (("a red apple", 1, 3.0), ("a dog", 2, 1.0))]
        with pytest.raises(RequestError, match="text-to-image"):
            sched.submit(Request(label=1))
        results = [f.result(60) for f in futures]
    for (p, s, c), result in zip((("a red apple", 1, 3.0), ("a dog", 2, 1.0)), results):
        for i in range(2):
            want = fluid.sample_tokens(1, texts=encoder([p]), num_iter=3, cfg=c,
                                       generator=[torch.Generator().manual_seed(s + i)])
            assert rel_err(result.tokens[i:i + 1], want) <= 1e-4


# HTTP ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def loading():
    """The service while its model loads: the loader waits for `release`."""
    from engine.serving.http import create_app

    release = threading.Event()
    model = engine.load("digits", num_sampling_steps="10")

    def loader():
        assert release.wait(60)
        return model, None
    server = Server(create_app(loader=loader, max_queue=64, max_batch_images=16))
    server.release, server.model = release, model
    yield server
    server.stop()


@pytest.fixture(scope="module")
def service(loading):
    loading.release.set()
    loading.wait_healthy()
    return loading


def post(server, **body):
    return server.client.post("/v1/images/generations", json=body)


def decode_png(item):
    from PIL import Image
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))))


def test_health_is_503_until_loaded_and_warm(loading):
    r = loading.client.get("/health")
    assert r.status_code == 503 and r.json()["status"] == "loading" and r.headers["retry-after"] == "1"
    r = post(loading, class_label=1)
    assert r.status_code == 503 and "not ready" in r.json()["error"]["message"]
    loading.release.set()
    loading.wait_healthy()
    body = loading.client.get("/health").json()
    assert body["status"] == "ok" and body["classes"] == 10 and body["max_images_per_request"] == 16


def test_http_images_equal_generate(service):
    r = post(service, class_label=7, n=2, seed=123, num_iter=3, cfg=2.5, cfg_schedule="constant",
             temperature=0.9, response_format="b64_json", model="digits", size="16x16")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["seed"] == 123 and len(body["data"]) == 2 and isinstance(body["created"], int)
    assert body["settings"] == {"num_iter": 3, "cfg": 2.5, "cfg_schedule": "constant", "temperature": 0.9, "n": 2,
                                "fast": "exact"}
    for i, item in enumerate(body["data"]):
        want = gen(service.model, 7, 123 + i, "pil", num_iter=3, cfg=2.5, cfg_schedule="constant", temperature=0.9)
        assert item["seed"] == 123 + i
        assert np.abs(decode_png(item).astype(int) - np.asarray(want[0]).astype(int)).max() <= 1
    # No seed: a random one, returned; asking again with it gives the same image.
    r = post(service, class_label=2, num_iter=2)
    seed = r.json()["seed"]
    again = post(service, class_label=2, num_iter=2, seed=seed).json()
    assert again["data"][0]["b64_json"] == r.json()["data"][0]["b64_json"]


def test_openai_client_shaped_requests(service):
    """What openai.OpenAI().images.generate(model=..., prompt="7", n=2, response_format="b64_json",
    extra_body={...}) sends: a prompt is always there; class models read a class number from it,
    or class_label from extra_body (the prompt then unread)."""
    base = {"model": "digits", "n": 2, "response_format": "b64_json", "seed": 40, "num_iter": 2}
    by_prompt = post(service, prompt="7", **base).json()
    by_label = post(service, prompt="a digit", class_label=7, **base).json()
    assert [d["b64_json"] for d in by_prompt["data"]] == [d["b64_json"] for d in by_label["data"]]
    want = gen(service.model, 7, 41, "pil", num_iter=2)
    assert np.abs(decode_png(by_prompt["data"][1]).astype(int) - np.asarray(want[0]).astype(int)).max() <= 1


@pytest.mark.parametrize("body,param,message", [
    (b"{not json", None, "must be a JSON object"),
    (b"[1, 2]", None, "must be a JSON object, got list"),
    (b"", None, "must be a JSON object"),
    (b'{"class_label": 1, "cfg": NaN}', "cfg", "finite number"),
    (b'{"class_label": 1, "temperature": Infinity}', "temperature", "finite number"),
    ({"class_label": 1, "cfg_scale": 3}, "cfg_scale", "unknown field"),
    ({}, "class_label", "required"),
    ({"class_label": 10}, "class_label", "out of range"),
    ({"class_label": -1}, "class_label", "out of range"),
    ({"class_label": "3"}, "class_label", "valid integer"),
    ({"class_label": True}, "class_label", "valid integer"),
    ({"prompt": "a seven"}, "prompt", "class-conditional"),
    ({"prompt": "12"}, "prompt", "out of range"),
    ({"prompt": 3}, "prompt", "valid string"),
    ({"class_label": 1, "n": 0}, "n", "from 1 to 16"),
    ({"class_label": 1, "n": 17}, "n", "from 1 to 16"),
    ({"class_label": 1, "n": 1.5}, "n", "valid integer"),
    ({"class_label": 1, "num_iter": 0}, "num_iter", "at least 1"),
    ({"class_label": 1, "num_iter": 70000}, "num_iter", "exceeds the limit"),
    ({"class_label": 1, "cfg": "high"}, "cfg", "valid number"),
    ({"class_label": 1, "cfg": 1e39}, "cfg", "float32 range"),
    ({"class_label": 1, "temperature": 0}, "temperature", "> 0"),
    ({"class_label": 1, "temperature": -1}, "temperature", "> 0"),
    ({"class_label": 1, "cfg_schedule": "cosine"}, "cfg_schedule", "unknown cfg_schedule"),
    ({"class_label": 1, "seed": -1}, "seed", "[0, 9223372036854775807]"),
    ({"class_label": 1, "seed": 2 ** 63}, "seed", "[0, 9223372036854775807]"),
    ({"class_label": 1, "seed": 1.5}, "seed", "valid integer"),
    ({"class_label": 1, "timeout": -1}, "timeout", "> 0"),
    ({"class_label": 1, "response_format": "url"}, "response_format", "b64_json"),
    ({"class_label": 1, "output_format": "gif"}, "output_format", "png"),
    ({"class_label": 1, "size": "256x256"}, "size", "16x16"),
])
def test_malformed_inputs_are_400_naming_the_field(service, body, param, message):
    """400 as the OpenAI API answers (was 422: SDK code catching BadRequestError missed them);
    `param` names the field (null for the body as a whole)."""
    if isinstance(body, bytes):
        r = service.client.post("/v1/images/generations", content=body,
                                headers={"content-type": "application/json"})
    else:
        r = service.client.post("/v1/images/generations", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert error["message"].startswith(param or "") and message in error["message"], error


def test_deadline_is_504(service, slow_steps):
    r = post(service, class_label=1, n=8, num_iter=32, timeout=0.05)
    assert r.status_code == 504 and "deadline" in r.json()["error"]["message"]


def test_client_disconnect_cancels(service, slow_steps):
    sched = service.server.config.app.state.engine.scheduler
    before = sched.counts["cancelled"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(service.url + "/v1/images/generations", timeout=0.3,
                   json={"class_label": 1, "n": 16, "num_iter": 64})
    deadline = time.monotonic() + 20
    while sched.counts["cancelled"] == before:
        assert time.monotonic() < deadline, "the request was not cancelled"
        time.sleep(0.02)
    while sched.images_in_flight:
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_metrics(service):
    post(service, class_label=3, num_iter=1)
    text = service.client.get("/metrics").text
    for name in ("engine_queue_depth", "engine_images_in_flight", "engine_step_seconds_bucket",
                 "engine_images_per_second", "engine_images_total", 'engine_requests_total{status="ok"}',
                 "engine_request_seconds_count", "engine_invalid_requests_total", "engine_ready 1.0"):
        assert name in text, name


def test_overload_answers_200_or_429_and_stays_healthy():
    from engine.serving.http import create_app

    model = engine.load("digits", num_sampling_steps="10")
    server = Server(create_app(model=model, max_queue=3, max_batch_images=4))
    try:
        server.wait_healthy()

        async def burst():
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
                return await asyncio.gather(*[client.post("/v1/images/generations", json={
                    "class_label": i % 10, "num_iter": 3, "seed": i}) for i in range(40)])
        answers = asyncio.run(burst())
        codes = [r.status_code for r in answers]
        assert len(codes) == 40 and set(codes) <= {200, 429, 503}, codes     # none lost, no 5xx
        # At least the queue's worth is served (more when the scheduler admits some to a running
        # batch before the burst ends; on a fast machine all 40 can arrive first).
        assert codes.count(200) >= 3 and codes.count(429) >= 1, codes
        for r in answers:
            if r.status_code == 429:
                assert int(r.headers["retry-after"]) >= 1 and "queue is full" in r.json()["error"]["message"]
            else:
                assert len(r.json()["data"]) == 1
        assert server.client.get("/health").status_code == 200
        assert post(server, class_label=1, num_iter=2).status_code == 200
        metrics = server.client.get("/metrics").text
        assert f'engine_rejections_total{{reason="queue_full"}} {codes.count(429)}.0' in metrics
    finally:
        server.stop()


# The command line ------------------------------------------------------------------------------
def test_serve_command_user_errors(capsys):
    from engine.cli import main

    for argv, message in ((["--checkpoint", "/nonexistent.pth"], "checkpoint not found"),
                          (["--max-queue", "0"], "--max-queue must be at least 1"),
                          (["--port", "70000"], "--port must be in")):
        assert main(["serve", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_serve_command_end_to_end(tmp_path):
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "engine", "serve", "--checkpoint", "digits", "--steps", "10",
                             "--port", str(port), "--max-queue", "8", "--threads", "1", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the server never became healthy"
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        r = httpx.post(url + "/v1/images/generations", json={"class_label": 4, "seed": 9, "num_iter": 2}, timeout=60)
        assert r.status_code == 200 and r.json()["seed"] == 9
    finally:
        proc.terminate()
        proc.wait(30)


# Adapters --------------------------------------------------------------------------------------
def test_litserve_adapter(model):
    pytest.importorskip("litserve")
    from fastapi.testclient import TestClient
    from litserve.utils import wrap_litserve_start

    from engine.serving.litserve_api import EngineLitAPI, server as lit_server

    api = EngineLitAPI("digits", load={"num_sampling_steps": "10"}, warmup=False)
    server = lit_server(api, accelerator="cpu", timeout=120)
    with wrap_litserve_start(server) as server, TestClient(server.app) as client:
        r = client.post("/v1/images/generations", json={"class_label": 6, "seed": 3, "num_iter": 2, "n": 2})
        assert r.status_code == 200, r.text
        for i, item in enumerate(r.json()["data"]):
            want = gen(model, 6, 3 + i, "pil", num_iter=2)
            assert np.abs(decode_png(item).astype(int) - np.asarray(want[0]).astype(int)).max() <= 1
        r = client.post("/v1/images/generations", json={"class_label": 10})
        assert r.status_code == 400 and "class_label" in r.text


def test_ray_serve_adapter(model):
    ray = pytest.importorskip("ray")
    serve = pytest.importorskip("ray.serve")
    from engine.serving.ray_serve import GenerationFailed, app

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        serve.start(proxy_location="Disabled")
        handle = serve.run(app("digits", ray_actor_options={"num_cpus": 1}, threads=1, warmup=False,
                               load={"num_sampling_steps": "10"}), name="engine-test", route_prefix=None)
        calls = [handle.generate.remote({"class_label": i, "seed": 20 + i, "num_iter": 2}) for i in range(3)]
        for i, call in enumerate(calls):
            item = call.result(timeout_s=120)["data"][0]
            want = gen(model, i, 20 + i, "pil", num_iter=2)
            assert np.abs(decode_png(item).astype(int) - np.asarray(want[0]).astype(int)).max() <= 1
        with pytest.raises(GenerationFailed) as err:
            handle.generate.remote({"class_label": 1, "n": 0}).result(timeout_s=60)
        assert err.value.status == 400 and "n: must be" in str(err.value)
    finally:
        serve.shutdown()
        ray.shutdown()
