"""An OpenAI-compatible image service over the Scheduler (FastAPI + uvicorn): `python -m engine serve`.

    POST /v1/images/generations   OpenAI Images request -> {"created", "data": [{"b64_json"}], ...};
                                  "stream": true -> server-sent events (engine.serving.streaming)
    GET  /v1/models, /v1/models/{id}   the served model (OpenAI Models API)
    GET  /health                  200 once loaded and warm; 503 while loading, failed or draining
    GET  /metrics                 Prometheus text (prometheus-client)

The body and its checks: engine.serving.schema; the answers: engine.serving.generation (shared
with the LitServe and Ray Serve adapters); request ids, the body limit, API keys, the error
shape and access logs: engine.serving.middleware. Every error is {"error": {"message", "type",
"param", "code"}}: 400 for an invalid body (`param` names the field), 401 without a valid API
key, 404 / 405, 413 over --max-body-bytes, 429 with Retry-After when the queue is full, 503
(Retry-After) while loading or draining, 504 past the deadline, 500 when the request's image
failed a step. A client that disconnects cancels its request. On SIGTERM the server drains:
/health says 503 "draining", new requests get 503 + Retry-After, the requests admitted finish,
then it exits (at the latest after --drain-timeout). The PNG of image i equals
engine.generate(model, [label], generator=[torch.Generator().manual_seed(seed + i)],
output_type="pil", ...) with the same settings.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import signal
import threading
import time

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse

from .errors import ApiError
from .generation import admit, describe, image_size, run_generation, wait_for_disconnect, warm
from .middleware import DEFAULT_MAX_BODY, ServingMiddleware
from .scheduler import MAX_IMAGES_PER_REQUEST, Scheduler, ServingError
from .schema import MAX_JSON_DEPTH, openapi
from . import streaming

log = logging.getLogger("engine.serving")
DEFAULT_TIMEOUT = 300.0
DEFAULT_DRAIN_TIMEOUT = 30.0
DEFAULT_REJECT_DELAY = 0.05    # seconds before a 429 / 503 refusal is sent
GENERATIONS = "/v1/images/generations"


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
        self.invalid = Counter("engine_invalid_requests", "Requests refused as malformed (400)",
                               registry=registry)
        self.responses = Counter("engine_http_responses", "HTTP answers, by status code", ["code"],
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
        self.draining: float | None = None     # monotonic time SIGTERM arrived
        self.active = 0                        # generation requests being answered


def create_app(model=None, *, loader=None, scheduler: Scheduler | None = None, vae=None,
               text_encoder=None, max_queue: int = 256, max_batch_images: int = 32,
               max_images_per_request: int = MAX_IMAGES_PER_REQUEST,
               timeout: float | None = DEFAULT_TIMEOUT, warmup: bool = True, model_name: str = "engine",
               on_failure=None, api_keys=(), max_body_bytes: int = DEFAULT_MAX_BODY,
               max_json_depth: int = MAX_JSON_DEPTH, priority_aging: float = 10.0,
               reject_delay: float = DEFAULT_REJECT_DELAY) -> FastAPI:
    """The FastAPI app. Give a loaded `model` (and its `vae` for latent models), a `loader()`
    returning (model, vae or None) (run in a thread at startup, so /health says 503
    meanwhile), or a ready `scheduler` (the app then never closes it). `on_failure(err)` is
    called if loading or the warm-up fails. `api_keys`: the keys /v1/ accepts (none: open).
    `reject_delay`: seconds a 429 / 503 refusal waits before it is sent (see ServingMiddleware)."""
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
                                  default_timeout=timeout, vae=decoder, text_encoder=text_encoder,
                                  priority_aging=priority_aging)
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

    app = FastAPI(title="engine", lifespan=lifespan, description="Image generation, OpenAI Images API")
    app.state.engine = state
    app.state.metrics = metrics

    def refuse(scope) -> ApiError | None:
        """A generation refused before its body is read: draining, not ready, the queue full."""
        if scope["method"] != "POST" or scope["path"] != GENERATIONS:
            return None
        try:
            admit(ready_scheduler(), None, metrics=metrics, draining=state.draining is not None, check_only=True)
        except ApiError as err:
            return err
        return None

    app.add_middleware(ServingMiddleware, max_body_bytes=max_body_bytes, api_keys=tuple(api_keys),
                       on_response=lambda status: metrics.responses.labels(str(status)).inc(),
                       refuse=refuse, reject_delay=reject_delay)

    def ready_scheduler() -> Scheduler | None:
        return state.scheduler if state.ready else None

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": int(state.started), "owned_by": "engine"}

    @app.api_route("/health", methods=["GET", "HEAD"])   # HEAD: load balancers' probes
    async def health():
        sched = state.scheduler
        if state.failed is not None:
            return unhealthy("failed", f"the model failed to load: {state.failed}", None)
        if state.draining is not None:
            return unhealthy("draining", "the server is draining (shutting down)", "5")
        if not state.ready or sched is None:
            return unhealthy("loading", "the model is loading and warming up", "1")
        if not sched.running:
            return unhealthy("stopped", "the scheduler has stopped", None)
        return {"status": "ok", **describe(sched, model_name)}

    def unhealthy(status: str, message: str, retry_after: str | None) -> JSONResponse:
        """503 with the state in "status" (for probes) and the OpenAI error object."""
        error = ApiError(503, message, code=f"server_{status}")
        return JSONResponse({"status": status, **error.payload}, status_code=503,
                            headers={"Retry-After": retry_after} if retry_after else None)

    @app.get("/metrics")
    async def metrics_endpoint():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str):
        if model_id != model_name:
            raise ApiError(404, f"the model {model_id!r:.100} does not exist; this server serves {model_name!r}",
                           "model", code="model_not_found")
        return model_card()

    @app.post(GENERATIONS)
    async def generations(http: HTTPRequest):
        request_id = http.scope.get("state", {}).get("request_id")
        state.active += 1
        try:
            raw = await http.body()
            if streaming.wants_stream(raw):
                return await stream(http, raw, request_id)
            status, payload, headers = await run_generation(
                ready_scheduler(), raw, metrics=metrics, disconnected=wait_for_disconnect(http),
                max_depth=max_json_depth, draining=state.draining is not None, request_id=request_id)
        finally:
            state.active -= 1
        if status == 499:
            return Response(status_code=499)
        return JSONResponse(payload, status_code=status, headers=headers)

    async def stream(http, raw, request_id):
        run = streaming.open_stream(ready_scheduler(), raw, metrics=metrics, max_depth=max_json_depth,
                                    draining=state.draining is not None, request_id=request_id)
        state.active += 1

        async def body():
            try:
                async for chunk in run(wait_for_disconnect(http)):
                    yield chunk
            finally:
                state.active -= 1
        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    @app.exception_handler(ApiError)
    async def api_error(http, err: ApiError):
        return JSONResponse(err.payload, status_code=err.status, headers=err.headers)

    def document():
        if app.openapi_schema is None or (state.ready and not getattr(app, "_engine_spec_ready", False)):
            from fastapi.openapi.utils import get_openapi

            sched = state.scheduler if state.ready else None
            base = get_openapi(title=app.title, version="1", description=app.description, routes=[])
            from ..core.plan import MAX_NUM_ITER
            app.openapi_schema = openapi(
                base, max_images=sched.max_images_per_request if sched else max_images_per_request,
                classes=None if sched is None or sched.text_model else sched.model.num_classes,
                text_model=bool(sched and sched.text_model), auth=bool(api_keys), max_num_iter=MAX_NUM_ITER,
                size=image_size(sched) if sched is not None else None,
                settings=set(sched.model.resolve_settings()) if sched is not None else None,
                fast_modes=tuple(getattr(sched.model, "fast_modes", ())) if sched is not None else None)
            app._engine_spec_ready = state.ready
        return app.openapi_schema
    app.openapi = document
    return app


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
          drain_timeout: float = DEFAULT_DRAIN_TIMEOUT) -> int:
    """Run the app with uvicorn until SIGTERM / SIGINT, then drain: /health answers 503
    "draining" and new requests 503 + Retry-After while the admitted ones finish; exit once none
    is left, or after `drain_timeout` seconds (those left then get 503). 2 if the model failed
    to load."""
    import uvicorn

    state = app.state.engine

    class Server(uvicorn.Server):
        cancelled: float | None = None

        def handle_exit(self, sig, frame):
            if state.draining is None and sig in (signal.SIGTERM, signal.SIGINT) and state.ready:
                state.draining = time.monotonic()
                log.info("engine: %s received; draining (at most %g s)", signal.Signals(sig).name, drain_timeout)
                return
            super().handle_exit(sig, frame)

        async def on_tick(self, counter: int) -> bool:
            if state.draining is not None and not self.should_exit:
                now = time.monotonic()
                if state.active and now - state.draining > drain_timeout and self.cancelled is None:
                    # Past the grace: what is left ends with 503 (SchedulerClosed) before the exit.
                    log.info("engine: drain timeout; cancelling %d requests", state.active)
                    self.cancelled = now
                    if state.scheduler is not None:
                        state.scheduler.close(wait=False, cancel=True)
                if state.active == 0 or (self.cancelled is not None and now - self.cancelled > 2):
                    log.info("engine: drained; exiting")
                    self.should_exit = True
            return await super().on_tick(counter)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=1,
                            access_log=False)   # ours: engine.serving.access, JSON lines
    server = Server(config)
    app.state.uvicorn_server = server
    server.run()
    failed = app.state.engine.failed
    return 2 if failed is not None else 0
