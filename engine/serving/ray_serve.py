"""A Ray Serve deployment over the Scheduler: replicas across devices and machines, each with
its own model and Scheduler, behind Ray Serve's HTTP proxy and load balancer.

    from ray import serve
    from engine.serving.ray_serve import app

    serve.run(app("digits", num_replicas=2, ray_actor_options={"num_cpus": 1}))  # or num_gpus=1
    # POST http://127.0.0.1:8000/v1/images/generations  (the body of engine.serving.http)

    handle = serve.get_deployment_handle("engine", app_name="default")
    payload = handle.generate.remote({"class_label": 3, "n": 2}).result()

A replica takes up to `max_ongoing_requests` requests at once (default 256, so its Scheduler
sees them all and batches them step by step); Ray Serve routes to the least busy replica. From
the command line: `serve run engine.serving.ray_serve:build_app checkpoint=digits num_replicas=2`.
"""
from __future__ import annotations

from ray import serve
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response, StreamingResponse

from .errors import ApiError, body_too_large, compressed_body
from .middleware import DEFAULT_MAX_BODY
from .scheduler import MAX_IMAGES_PER_REQUEST, Scheduler, ServingError
from .schema import MAX_JSON_DEPTH
from . import streaming


class GenerationFailed(ServingError):
    """A handle call that did not end with images: `status` is the HTTP status it would get."""

    def __init__(self, status: int, payload: dict):
        error = payload.get("error", {}) if isinstance(payload, dict) else {}
        super().__init__(f"{status}: {error.get('message', payload)}")
        self.status, self.payload = status, payload

    def __reduce__(self):   # crosses process boundaries (Ray)
        return type(self), (self.status, self.payload)


@serve.deployment(name="engine", max_ongoing_requests=256, health_check_period_s=10)
class EngineDeployment:
    """One replica: a model, its Scheduler, and the engine's request handling."""

    def __init__(self, checkpoint: str = "digits", load: dict | None = None, vae: str | None = None,
                 max_batch_images: int = 32, max_queue: int = 256,
                 max_images_per_request: int = MAX_IMAGES_PER_REQUEST, timeout: float | None = 300.0,
                 threads: int | None = None, warmup: bool = True, max_body_bytes: int = DEFAULT_MAX_BODY,
                 max_json_depth: int = MAX_JSON_DEPTH, model_name: str | None = None):
        import engine
        from ..arguments import set_threads
        from .generation import warm

        set_threads(threads, "threads")
        load = dict(load or {})
        model = engine.load(checkpoint, **load)
        decoder = engine.load_vae(vae, device=load.get("device", "cpu")) if vae else None
        self.scheduler = Scheduler(model, vae=decoder, max_batch_images=max_batch_images,
                                   max_queue=max_queue, max_images_per_request=max_images_per_request,
                                   default_timeout=timeout)
        self.max_body_bytes, self.max_json_depth = int(max_body_bytes), int(max_json_depth)
        self.model_name = model_name or str(checkpoint)
        if warmup:
            warm(self.scheduler)

    async def __call__(self, http: HTTPRequest) -> Response:
        """HTTP through Ray Serve's proxy, answered as engine.serving.http answers: POST
        /v1/images/generations (or the route prefix itself) a generation body; GET /health,
        /v1/models. Errors in the OpenAI shape (413 past max_body_bytes); `stream: true` answers
        server-sent events."""
        from .generation import describe, run_generation, wait_for_disconnect

        path = http.url.path.rstrip("/")
        prefix = http.scope.get("root_path", "").rstrip("/")
        route = path[len(prefix):] if prefix and path.startswith(prefix) else path
        routes = {"/health": "GET", "/v1/models": "GET", "/v1/images/generations": "POST", "": "POST"}
        try:
            if route not in routes:
                raise ApiError(404, f"no route {path[:200]!r}; POST /v1/images/generations")
            if http.method != routes[route] and not (http.method == "HEAD" and routes[route] == "GET"):
                raise ApiError(405, f"{http.method} is not allowed on {path[:200]!r}; use {routes[route]}")
            if route == "/health":
                return JSONResponse({"status": "ok", **describe(self.scheduler, self.model_name)})
            if route == "/v1/models":
                return JSONResponse({"object": "list", "data": [{"id": self.model_name, "object": "model",
                                                                 "created": 0, "owned_by": "engine"}]})
            body = await read_body(http, self.max_body_bytes)
            if streaming.wants_stream(body):   # server-sent events, as engine serve streams them
                run = streaming.open_stream(self.scheduler, body, max_depth=self.max_json_depth)
                return StreamingResponse(run(wait_for_disconnect(http)), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache"})
        except ApiError as err:
            return JSONResponse(err.payload, status_code=err.status, headers=err.headers)
        status, payload, headers = await run_generation(self.scheduler, body, disconnected=wait_for_disconnect(http),
                                                        max_depth=self.max_json_depth)
        if status == 499:
            return Response(status_code=499)
        return JSONResponse(payload, status_code=status, headers=headers)

    async def generate(self, body: dict) -> dict:
        """For deployment handles: the response payload, or GenerationFailed(status, payload)."""
        from .generation import run_generation

        status, payload, _ = await run_generation(self.scheduler, body, max_depth=self.max_json_depth)
        if status != 200:
            raise GenerationFailed(status, payload)
        return payload

    def check_health(self) -> None:
        if not self.scheduler.running:
            raise ServingError("the scheduler is not running")

    def __del__(self):
        scheduler = getattr(self, "scheduler", None)
        if scheduler is not None:
            scheduler.close(wait=False, cancel=True)


async def read_body(http: HTTPRequest, limit: int) -> bytes:
    """The body, ApiError 413 once it passes `limit` bytes (not read further), 415 compressed."""
    refusal = compressed_body(http.headers.get("content-encoding"))
    if refusal is not None:
        raise refusal
    length = http.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise body_too_large(limit)
    chunks, size = [], 0
    async for chunk in http.stream():
        size += len(chunk)
        if size > limit:
            raise body_too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def app(checkpoint: str = "digits", num_replicas: int = 1, ray_actor_options: dict | None = None,
        **kwargs):
    """The bound application: serve.run(app(...)). `kwargs` go to EngineDeployment (load=,
    vae=, max_batch_images=, max_queue=, max_images_per_request=, timeout=, threads=,
    warmup=, max_body_bytes=, max_json_depth=, model_name=)."""
    options = {"num_replicas": int(num_replicas)}
    if ray_actor_options is not None:
        options["ray_actor_options"] = ray_actor_options
    return EngineDeployment.options(**options).bind(checkpoint, **kwargs)


def build_app(args: dict):
    """Application builder for `serve run engine.serving.ray_serve:build_app checkpoint=digits
    num_replicas=2 num_cpus=1` (values arrive as strings)."""
    args = dict(args)
    ints = ("num_replicas", "max_batch_images", "max_queue", "max_images_per_request", "threads",
            "max_body_bytes", "max_json_depth")
    for key in ints:
        if key in args:
            args[key] = int(args[key])
    if "timeout" in args:
        args["timeout"] = float(args["timeout"])
    actor = {}
    for key in ("num_cpus", "num_gpus"):
        if key in args:
            actor[key] = float(args.pop(key))
    if actor:
        args["ray_actor_options"] = actor
    return app(**args)
