"""The service through the official `openai` SDK (sync and async clients) against a real server
on a loopback port: models.list / retrieve, images.generate (n 1-4, seeds), streaming with
partial images, and the SDK's errors for 400 / 401 / 404 / 429. Images are checked against
engine.generate; partial images against the protocol's batcher stepped by hand."""
import asyncio
import base64
import io
import threading
import time

import numpy as np
import pytest
import torch

import engine
from engine.serving import Scheduler
from engine.serving.http import create_app
from servers import Gate, Server

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.usefixtures("one_thread")
KEYS = ("sk-test-one", "sk-test-two")


@pytest.fixture(scope="module")
def model():
    return engine.load("digits", num_sampling_steps="10")


@pytest.fixture(scope="module")
def server(model):
    srv = Server(create_app(model=model, model_name="digits", api_keys=KEYS, max_batch_images=8)).wait_healthy()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEYS[1], max_retries=0)


def pixels(b64: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64)))).astype(int)


def want(model, label, seed, **settings) -> np.ndarray:
    image = engine.generate(model, [label], generator=[torch.Generator().manual_seed(seed)], output_type="pil",
                            **settings)[0]
    return np.asarray(image).astype(int)


def test_models_list_and_retrieve(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["digits"] and models.data[0].object == "model"
    assert client.models.retrieve("digits").id == "digits"
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("gpt-image-1")
    assert err.value.code == "model_not_found" and err.value.type == "invalid_request_error"


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_generate_n_images_with_seeds(client, model, n):
    r = client.images.generate(model="digits", prompt="7", n=n, response_format="b64_json",
                               extra_body={"seed": 40 + n, "num_iter": 2})
    assert len(r.data) == n
    for i, item in enumerate(r.data):
        assert np.abs(pixels(item.b64_json) - want(model, 7, 40 + n + i, num_iter=2)).max() <= 1


def test_async_client_concurrent_requests(server, model):
    async def main():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEYS[0], max_retries=0) as client:
            return await asyncio.gather(*[client.images.generate(
                model="digits", prompt="a digit", extra_body={"class_label": k, "seed": k, "num_iter": 2})
                for k in range(3)])
    for k, r in enumerate(asyncio.run(main())):
        assert np.abs(pixels(r.data[0].b64_json) - want(model, k, k, num_iter=2)).max() <= 1


@pytest.mark.parametrize("extra,param", [({"n": 0}, "n"), ({"n": 17}, "n"), ({"seed": -1}, "seed"),
                                         ({"cfg_scale": 2}, "cfg_scale"), ({"partial_images": 4}, "partial_images"),
                                         ({"priority": "high"}, "priority")])
def test_bad_request_error_names_the_param(client, extra, param):
    n = extra.pop("n", None)
    kwargs = {"n": n} if n is not None else {}
    with pytest.raises(openai.BadRequestError) as err:
        client.images.generate(model="digits", prompt="7", extra_body=extra, **kwargs)
    assert err.value.status_code == 400 and err.value.param == param and err.value.type == "invalid_request_error"


def test_authentication_error(server):
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        bad.models.list()
    assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        bad.images.generate(model="digits", prompt="1")




def test_rate_limit_error_with_retry_after(model, monkeypatch):
    gate = Gate(monkeypatch)
    srv = Server(create_app(model=model, model_name="digits", max_queue=1, max_batch_images=1, warmup=False))
    try:
        srv.wait_healthy()
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        answers = []
        call = lambda: answers.append(client.images.generate(prompt="1", extra_body={"num_iter": 2}))  # noqa: E731
        threads = [threading.Thread(target=call) for _ in range(2)]
        threads[0].start()
        assert gate.entered.wait(30)                 # one image in flight: no free slot
        threads[1].start()
        deadline = time.monotonic() + 30
        while srv.scheduler.queue_depth < 1:         # one request waits for room: the queue is full
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(openai.RateLimitError) as err:
            client.images.generate(prompt="2", extra_body={"num_iter": 2})
        assert err.value.status_code == 429 and int(err.value.response.headers["retry-after"]) >= 1
        assert err.value.code == "rate_limit_exceeded"
        # The refusal is decided before the body is read or parsed: it costs no parsing.
        r = srv.client.post("/v1/images/generations", content=b"x" * 3_000_000)
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
        assert 'engine_rejections_total{reason="queue_full"} 2.0' in srv.client.get("/metrics").text
        gate.release.set()
        for t in threads:
            t.join(60)
        assert len(answers) == 2 and all(len(a.data) == 1 for a in answers)
    finally:
        gate.release.set()
        srv.stop()


def expected_partials(model, label, seed, num_iter, partial_images):
    """PNGs of the protocol's batcher stepped by hand: preview() after the evenly spaced steps."""
    batcher = model.batcher(1)
    image = batcher.add(label=label, settings=model.resolve_settings(num_iter=num_iter),
                        generator=torch.Generator().manual_seed(seed))
    total = image.num_steps
    at = sorted({round(total * j / (partial_images + 1)) for j in range(1, partial_images + 1)} & set(range(1, total)))
    pngs = []
    for k in range(1, max(at) + 1):
        batcher.step([image])
        if k in at:
            pngs.append(Scheduler(model, start=False).png(batcher.preview([image]))[0])
    return pngs


@pytest.mark.parametrize("partial_images", [0, 1, 2, 3])
def test_stream_partial_images(client, model, partial_images):
    stream = client.images.generate(model="digits", prompt="7", stream=True, partial_images=partial_images,
                                    extra_body={"seed": 5, "num_iter": 8})
    events = list(stream)
    assert [e.type for e in events] == ["image_generation.partial_image"] * partial_images + \
        ["image_generation.completed"]
    partials, completed = events[:-1], events[-1]
    assert [e.partial_image_index for e in partials] == list(range(partial_images))
    assert all(e.size == "16x16" and e.output_format == "png" for e in events)
    plain = client.images.generate(model="digits", prompt="7", extra_body={"seed": 5, "num_iter": 8})
    assert completed.b64_json == plain.data[0].b64_json          # the same PNG bytes
    if partial_images:
        want_pngs = expected_partials(model, 7, 5, 8, partial_images)
        assert [base64.b64decode(e.b64_json) for e in partials] == want_pngs
        assert len({e.b64_json for e in events}) == len(events)   # each preview shows more


def test_stream_n_images_async(server, model):
    async def main():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEYS[0], max_retries=0) as client:
            stream = await client.images.generate(model="digits", prompt="3", n=2, stream=True, partial_images=1,
                                                  extra_body={"seed": 9, "num_iter": 4})
            return [event async for event in stream]
    events = asyncio.run(main())
    completed = [e for e in events if e.type == "image_generation.completed"]
    assert sorted(e.image_index for e in events if e.type == "image_generation.partial_image") == [0, 1]
    assert [e.image_index for e in completed] == [0, 1]
    for e in completed:
        assert np.abs(pixels(e.b64_json) - want(model, 3, 9 + e.image_index, num_iter=4)).max() <= 1


@pytest.mark.parametrize("output_format", ["jpeg", "webp"])
def test_output_format_and_compression(client, model, output_format):
    # The image in the format asked for (PIL reads it as such); WebP at the default compression
    # 100 is lossless (the PNG's pixels), JPEG close to them; a lower compression is smaller.
    from PIL import Image

    def generate(**fields):
        return client.images.generate(model="digits", prompt="4", output_format=output_format,
                                      extra_body={"seed": 11, "num_iter": 4}, **fields)
    best, small = generate(), generate(output_compression=10)
    assert best.output_format == output_format and best.size == "16x16"
    data = [base64.b64decode(r.data[0].b64_json) for r in (best, small)]
    assert [Image.open(io.BytesIO(d)).format for d in data] == [output_format.upper()] * 2
    assert len(data[1]) < len(data[0])
    exact = want(model, 4, 11, num_iter=4)
    got = Image.open(io.BytesIO(data[0]))   # WebP stores a grey image as RGB (equal channels)
    got = np.asarray(got.convert("L") if exact.ndim == 2 else got.convert("RGB")).astype(int)
    error = np.abs(got - exact)
    assert error.max() == 0 if output_format == "webp" else error.mean() < 3
    events = list(client.images.generate(model="digits", prompt="4", output_format=output_format,
                                         stream=True, partial_images=1, extra_body={"seed": 11, "num_iter": 4}))
    assert [e.output_format for e in events] == [output_format] * 2
    assert all(Image.open(io.BytesIO(base64.b64decode(e.b64_json))).format == output_format.upper()
               for e in events)
    assert events[-1].b64_json == best.data[0].b64_json


def test_a_failing_image_fails_only_its_request(server, model, monkeypatch):
    """Two concurrent SDK calls; a fault injected inside the step for one image of the first:
    it gets InternalServerError (500, OpenAI shape), the other its solo images."""
    import engine.core.loop as loop

    real = loop._draw_one

    def draw(num_steps, n, dim, use_cfg, generator, device):
        if generator.initial_seed() == 801:
            raise RuntimeError("injected fault")
        return real(num_steps, n, dim, use_cfg, generator, device)
    monkeypatch.setattr(loop, "_draw_one", draw)

    async def main():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEYS[0], max_retries=0) as client:
            return await asyncio.gather(*[client.images.generate(
                model="digits", prompt=str(label), n=2, extra_body={"seed": seed, "num_iter": 3})
                for label, seed in ((4, 800), (6, 900))], return_exceptions=True)
    failed, served = asyncio.run(main())
    assert isinstance(failed, openai.InternalServerError) and failed.status_code == 500
    assert "injected fault" in failed.message and failed.code == "server_error"
    for i, item in enumerate(served.data):
        assert np.abs(pixels(item.b64_json) - want(model, 6, 900 + i, num_iter=3)).max() <= 1


def test_stream_disconnect_cancels_the_request(server):
    import httpx

    sched = server.scheduler
    before = sched.counts["cancelled"]
    with httpx.stream("POST", server.url + "/v1/images/generations", timeout=60,
                      headers={"authorization": f"Bearer {KEYS[0]}"},
                      json={"class_label": 1, "n": 16, "num_iter": 16, "stream": True, "partial_images": 3}) as r:
        assert next(r.iter_lines()) == "event: image_generation.partial_image"
    deadline = time.monotonic() + 30
    while sched.counts["cancelled"] == before or sched.images_in_flight:
        assert time.monotonic() < deadline, "the request was not cancelled"
        time.sleep(0.02)
