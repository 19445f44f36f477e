"""An OpenAI-style image service over the Scheduler (FastAPI + uvicorn): `python -m engine serve`.

    POST /v1/images/generations   OpenAI Images request -> {"created", "data": [{"b64_json"}], ...}
    GET  /health                  200 once the model is loaded and warm, else 503
    GET  /metrics                 Prometheus text (prometheus-client)

Request body (JSON object; unknown fields are refused, so a misspelt setting is never ignored):
  prompt          text (text-to-image models; required there). Class-conditional models take a
                  class number as the prompt ("207"), or read class_label and ignore the prompt
  class_label     int, 0 .. classes-1 (class-conditional models: it or a numeric prompt)
  n               images, 1 .. max_images_per_request (default 1; the server's --max-images)
  response_format "b64_json" (PNG; the only format)    size  "WxH", must be the model's size
  model, user, quality, style: accepted, ignored      output_format: "png" only
  seed            int in [0, 2^63-1]; missing: a random one. Image i uses seed + i; the seed is
                  returned ("seed" at the top and per image)
  num_iter, cfg, cfg_schedule ("linear" | "constant"), temperature: missing -> model defaults
  timeout         seconds (default: the server's --timeout); past it the answer is 504

Status codes: 200; 422 for a malformed body or a bad field ({"error": {"message", "type",
"param"}} with `param` naming the field); 429 with Retry-After when the queue is full; 503
(Retry-After) while loading or shutting down; 504 past the deadline; 500 if a sampling step
failed. A client that disconnects cancels its request (its images leave at the next step).
The PNG of image i equals engine.generate(model, [label], generator=[torch.Generator()
.manual_seed(seed + i)], output_type="pil", ...) with the same settings.
"""
from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import json
import logging
import math
import re
import threading
import time
from typing import Literal, Optional

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from .scheduler import (MAX_IMAGES_PER_REQUEST, DeadlineExceeded, QueueFullError, Request,
                        RequestError, Scheduler, SchedulerClosed, ServingError)

log = logging.getLogger("engine.serving")
DEFAULT_TIMEOUT = 300.0


class ImageGenerationRequest(BaseModel):
    """The body of POST /v1/images/generations (OpenAI Images shape + engine extensions)."""
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prompt: Optional[StrictStr] = None
    class_label: Optional[StrictInt] = None
    n: StrictInt = 1
    response_format: Literal["b64_json"] = "b64_json"
    output_format: Optional[Literal["png"]] = None
    size: Optional[StrictStr] = None
    model: Optional[StrictStr] = None
    user: Optional[StrictStr] = None
    quality: Optional[StrictStr] = None
    style: Optional[StrictStr] = None
    seed: Optional[StrictInt] = None
    num_iter: Optional[StrictInt] = None
    cfg: Optional[float] = Field(default=None, strict=True)
    cfg_schedule: Optional[StrictStr] = None
    temperature: Optional[float] = Field(default=None, strict=True)
    timeout: Optional[float] = Field(default=None, strict=True)


class Metrics:
    """Prometheus metrics of one app (its own registry, so several apps can live in a process)."""

    def __init__(self, state: "ServerState"):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = registry = CollectorRegistry()
        self._images = collections.deque()     # (time, images) of recent completions
        self._lock = threading.Lock()
        Gauge("engine_queue_depth", "Requests waiting for a slot", registry=registry).set_function(
            lambda: state.scheduler.queue_depth if state.scheduler else 0)
        Gauge("engine_images_in_flight", "Images being sampled", registry=registry).set_function(
            lambda: state.scheduler.images_in_flight if state.scheduler else 0)
        Gauge("engine_images_per_second", "Images finished per second over the last 30 s",
              registry=registry).set_function(self.images_per_second)
        Gauge("engine_ready", "1 once the model is loaded and warm", registry=registry).set_function(
            lambda: 1 if state.ready else 0)
        self.step_seconds = Histogram(
            "engine_step_seconds", "Latency of one scheduler iteration (one plan step of every image in flight)",
            buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30), registry=registry)
        self.step_images = Histogram("engine_step_images", "Images in one scheduler iteration",
                                     buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=registry)
        self.step_groups = Histogram("engine_step_groups", "Transformer passes (distinct step shapes) in one iteration",
                                     buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64), registry=registry)
        self.request_seconds = Histogram(
            "engine_request_seconds", "Request latency, submission to last step",
            buckets=(.05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120, 300), registry=registry)
        self.requests = Counter("engine_requests", "Requests that ended, by status",
                                ["status"], registry=registry)
        self.images = Counter("engine_images", "Images generated", registry=registry)
        self.rejections = Counter("engine_rejections", "Requests refused, by reason", ["reason"],
                                  registry=registry)
        self.invalid = Counter("engine_invalid_requests", "Requests refused as malformed (422)",
                               registry=registry)

    def attach(self, scheduler: Scheduler) -> None:
        scheduler.add_step_listener(self.on_step)
        scheduler.add_finish_listener(self.on_finish)

    def on_step(self, seconds, images, rows, groups) -> None:
        self.step_seconds.observe(seconds)
        self.step_images.observe(images)
        self.step_groups.observe(groups)

    def on_finish(self, status, seconds, images) -> None:
        self.requests.labels(status).inc()
        if status == "ok":
            self.request_seconds.observe(seconds)
            self.images.inc(images)
            with self._lock:
                self._images.append((time.monotonic(), images))

    def images_per_second(self, window: float = 30.0) -> float:
        now = time.monotonic()
        with self._lock:
            while self._images and self._images[0][0] < now - window:
                self._images.popleft()
            if not self._images:
                return 0.0
            total = sum(n for _, n in self._images)
        return total / window

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class ServerState:
    def __init__(self):
        self.scheduler: Scheduler | None = None
        self.model = None
        self.ready = False
        self.failed: BaseException | None = None
        self.started = time.time()


def create_app(model=None, *, loader=None, scheduler: Scheduler | None = None, vae=None,
               text_encoder=None, max_queue: int = 256, max_batch_images: int = 32,
               max_images_per_request: int = MAX_IMAGES_PER_REQUEST,
               timeout: float | None = DEFAULT_TIMEOUT, warmup: bool = True, model_name: str = "engine",
               on_failure=None) -> FastAPI:
    """The FastAPI app. Give a loaded `model` (and its `vae` for latent models), a `loader()`
    returning (model, vae or None) (run in a thread at startup, so /health says 503
    meanwhile), or a ready `scheduler` (the app then never closes it). `on_failure(err)` is
    called if loading or the warm-up fails."""
    if sum(x is not None for x in (model, loader, scheduler)) != 1:
        raise ServingError("create_app needs exactly one of model=, loader= or scheduler=")
    state = ServerState()
    metrics = Metrics(state)

    def bring_up():
        try:
            sched = scheduler
            if sched is None:
                m, decoder = (model, vae) if model is not None else loader()
                sched = Scheduler(m, max_batch_images=max_batch_images, max_queue=max_queue,
                                  max_images_per_request=max_images_per_request,
                                  default_timeout=timeout, vae=decoder, text_encoder=text_encoder)
            state.model = sched.model
            state.scheduler = sched
            if warmup:
                warm(sched)
            metrics.attach(sched)      # after the warm-up: it is not served traffic
            state.ready = True
            log.info("engine: model loaded and warm; serving")
        except BaseException as err:   # noqa: BLE001
            state.failed = err
            log.error("engine: the model failed to load or warm up: %s", err)
            if on_failure is not None:
                on_failure(err)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        thread = threading.Thread(target=bring_up, name="engine-load", daemon=True)
        thread.start()
        try:
            yield
        finally:
            state.ready = False
            if state.scheduler is not None and scheduler is None:
                await asyncio.to_thread(state.scheduler.close, True, True)

    app = FastAPI(title="engine", lifespan=lifespan,
                  description="Masked-autoregressive image generation (MAR / Fluid), OpenAI Images API shape")
    app.state.engine = state
    app.state.metrics = metrics

    @app.get("/health")
    async def health():
        if state.failed is not None:
            return JSONResponse({"status": "failed", "error": str(state.failed)}, status_code=503)
        sched = state.scheduler
        if not state.ready or sched is None:
            return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "1"})
        if not sched.running:
            return JSONResponse({"status": "stopped"}, status_code=503)
        return {"status": "ok", **describe(sched, model_name)}

    @app.get("/metrics")
    async def metrics_endpoint():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.post("/v1/images/generations", openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": ImageGenerationRequest.model_json_schema()}}}})
    async def generations(http: HTTPRequest):
        sched = state.scheduler if state.ready else None
        status, payload, headers = await run_generation(
            sched, await http.body(), metrics=metrics, disconnected=wait_for_disconnect(http))
        if status == 499:
            return Response(status_code=499)
        return JSONResponse(payload, status_code=status, headers=headers)

    return app


def parse_body(raw) -> ImageGenerationRequest:
    """A request body (JSON bytes / str, or an already decoded dict) checked field by field;
    raises RequestError naming the first bad field."""
    from pydantic import ValidationError

    if isinstance(raw, (bytes, bytearray, str)):
        try:
            raw = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as err:
            raise RequestError("body", f"the body must be a JSON object: {err}") from None
    if not isinstance(raw, dict):
        raise RequestError("body", f"the body must be a JSON object, got {type(raw).__name__}")
    try:
        return ImageGenerationRequest.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first.get("loc", ())) or "body"
        message = first.get("msg", "invalid value")
        if first.get("type") == "extra_forbidden":
            message = "unknown field (see docs/serving.md for the accepted ones)"
        raise RequestError(field, f"{field}: {message}") from None


async def run_generation(sched: Scheduler | None, raw, metrics: Metrics | None = None,
                         disconnected=None) -> tuple[int, dict, dict]:
    """One POST /v1/images/generations: (status, JSON payload, headers). `disconnected`: an
    awaitable that completes when the client goes away (the request is then cancelled; 499).
    Shared by the FastAPI app and the LitServe / Ray Serve adapters."""
    def count(name, label=None):
        if metrics is not None:
            metric = getattr(metrics, name)
            (metric.labels(label) if label else metric).inc()

    try:
        if sched is None or not sched.running:
            count("rejections", "not_ready")
            return 503, error_body("the model is not ready (loading, failed or shutting down)",
                                   kind="server_error"), {"Retry-After": "1"}
        try:
            request = to_request(parse_body(raw), sched)
            future = sched.submit(request)
        except RequestError as err:
            count("invalid")
            return 422, error_body(str(err), err.field), {}
        except QueueFullError as err:
            count("rejections", "queue_full")
            return 429, error_body(str(err), kind="rate_limit_error"), \
                {"Retry-After": str(int(math.ceil(err.retry_after)))}
        except SchedulerClosed as err:
            count("rejections", "closed")
            return 503, error_body(str(err), kind="server_error"), {"Retry-After": "1"}
        waiter = asyncio.wrap_future(future)
        if disconnected is not None:
            watcher = asyncio.ensure_future(disconnected)
            disconnected = None
            try:
                await asyncio.wait({waiter, watcher}, return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:   # the server is stopping this task: drop the work
                future.cancel()
                raise
            finally:
                watcher.cancel()
            if not waiter.done():     # the client went away: drop its work
                future.cancel()
                waiter.cancel()
                return 499, {}, {}
        try:
            result = await waiter
        except DeadlineExceeded as err:
            return 504, error_body(str(err), kind="timeout_error"), {}
        except asyncio.CancelledError:
            if not future.cancelled():
                raise      # the serving task itself was cancelled
            return 503, error_body("the request was cancelled", kind="server_error"), {}
        except SchedulerClosed as err:
            return 503, error_body(str(err), kind="server_error"), {"Retry-After": "1"}
        except RequestError as err:
            return 422, error_body(str(err), err.field), {}
        except Exception as err:   # noqa: BLE001 - a failed step: 500 with its message
            return 500, error_body(f"{type(err).__name__}: {err}", kind="server_error"), {}
        pngs = await asyncio.to_thread(result.png)
        return 200, response_body(result, pngs), {}
    finally:
        if asyncio.iscoroutine(disconnected):
            disconnected.close()   # not awaited: we answered before waiting


def response_body(result, pngs: list[bytes]) -> dict:
    seed = result.request.seed
    return {"created": int(time.time()),
            "data": [{"b64_json": base64.b64encode(p).decode("ascii"), "seed": seed + i}
                     for i, p in enumerate(pngs)],
            "seed": seed, "settings": settings_of(result.request)}


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


async def wait_for_disconnect(http: HTTPRequest) -> None:
    """Returns when the client disconnects (the body has been read: the next ASGI message is the
    disconnect)."""
    while True:
        message = await http.receive()
        if message["type"] == "http.disconnect":
            return


def to_request(body: ImageGenerationRequest, sched: Scheduler) -> Request:
    """The Scheduler request of a checked body. Class-conditional models read `class_label`,
    or a prompt that is a class number ("207": the OpenAI client always sends a prompt); when
    class_label is given a prompt is not read."""
    model = sched.model
    if not sched.decodable:
        what = "VAE latents and the server has no --vae" if model.decoder == "vae" else \
            "binary tokens and the server has no --bae"
        raise RequestError("request", f"this model generates {what} to decode them into images")
    label, prompt = body.class_label, body.prompt
    if sched.text_model:
        if label is not None:
            raise RequestError("class_label", "this is a text-to-image model: pass prompt, not class_label")
        if prompt is None:
            raise RequestError("prompt", "required for this text-to-image model")
    else:
        classes = model.num_classes
        if label is None:
            if prompt is None:
                raise RequestError("class_label", f"required for this class-conditional model (0..{classes - 1})")
            if not re.fullmatch(r"\s*[0-9]+\s*", prompt):
                raise RequestError("prompt", "this is a class-conditional model: pass class_label "
                                   f"(0..{classes - 1}), or a class number as the prompt; got {prompt!r:.60}")
            label = int(prompt)
            if label >= classes:
                raise RequestError("prompt", f"class {label} is out of range: this model has {classes} "
                                   f"classes (0..{classes - 1})")
        prompt = None
    if body.size is not None and body.size != image_size(sched):
        raise RequestError("size", f"this model generates {image_size(sched)} images, got {body.size!r}")
    return Request(label=label, prompt=prompt, n=body.n, num_iter=body.num_iter,
                   cfg=body.cfg, cfg_schedule=body.cfg_schedule, temperature=body.temperature,
                   seed=body.seed, timeout=body.timeout)


def image_size(sched: Scheduler) -> str:
    height, width, _ = sched.image_shape()
    return f"{width}x{height}"


def settings_of(request: Request) -> dict:
    return {"num_iter": request.num_iter, "cfg": request.cfg, "cfg_schedule": request.cfg_schedule,
            "temperature": request.temperature, "n": request.n}


def describe(sched: Scheduler, model_name: str) -> dict:
    model = sched.model
    out = {"model": model_name, "family": model.family, "size": image_size(sched),
           "max_images_per_request": sched.max_images_per_request,
           "max_batch_images": sched.max_batch_images, "max_queue": sched.max_queue,
           "queue_depth": sched.queue_depth, "images_in_flight": sched.images_in_flight,
           "backend": model.backend_name}
    if not sched.text_model:
        out["classes"] = model.num_classes
    return out


def warm(sched: Scheduler) -> None:
    """One short request through the whole path (native build, transformer, head, decode)."""
    label = None if sched.text_model else 0
    try:   # one step where the family takes a step count, else its own length
        request = sched.resolve(Request(label=label, n=1, num_iter=1, seed=0))
    except RequestError:
        request = Request(label=label, n=1, seed=0)
    result = sched.submit(request).result()
    result.png()


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> int:
    """Run the app with uvicorn until interrupted; 2 if the model failed to load."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=30)
    server = uvicorn.Server(config)
    app.state.uvicorn_server = server
    server.run()
    failed = app.state.engine.failed
    return 2 if failed is not None else 0
