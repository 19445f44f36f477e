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
from starlette.responses import JSONResponse, Response

from .scheduler import MAX_IMAGES_PER_REQUEST, Scheduler, ServingError


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
                 threads: int | None = None, warmup: bool = True):
        import torch

        import engine
        from .http import warm

        if threads:
            torch.set_num_threads(threads)
        load = dict(load or {})
        model = engine.load(checkpoint, **load)
        decoder = engine.load_vae(vae, device=load.get("device", "cpu")) if vae else None
        self.scheduler = Scheduler(model, vae=decoder, max_batch_images=max_batch_images,
                                   max_queue=max_queue, max_images_per_request=max_images_per_request,
                                   default_timeout=timeout)
        if warmup:
            warm(self.scheduler)

    async def __call__(self, http: HTTPRequest) -> Response:
        """HTTP through Ray Serve's proxy: POST a generation body; GET for health."""
        from .http import describe, run_generation, wait_for_disconnect

        if http.method == "GET":
            return JSONResponse({"status": "ok", **describe(self.scheduler, "engine")})
        status, payload, headers = await run_generation(self.scheduler, await http.body(),
                                                        disconnected=wait_for_disconnect(http))
        if status == 499:
            return Response(status_code=499)
        return JSONResponse(payload, status_code=status, headers=headers)

    async def generate(self, body: dict) -> dict:
        """For deployment handles: the response payload, or GenerationFailed(status, payload)."""
        from .http import run_generation

        status, payload, _ = await run_generation(self.scheduler, body)
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


def app(checkpoint: str = "digits", num_replicas: int = 1, ray_actor_options: dict | None = None,
        **kwargs):
    """The bound application: serve.run(app(...)). `kwargs` go to EngineDeployment (load=,
    vae=, max_batch_images=, max_queue=, max_images_per_request=, timeout=, threads=,
    warmup=)."""
    options = {"num_replicas": int(num_replicas)}
    if ray_actor_options is not None:
        options["ray_actor_options"] = ray_actor_options
    return EngineDeployment.options(**options).bind(checkpoint, **kwargs)


def build_app(args: dict):
    """Application builder for `serve run engine.serving.ray_serve:build_app checkpoint=digits
    num_replicas=2 num_cpus=1` (values arrive as strings)."""
    args = dict(args)
    ints = ("num_replicas", "max_batch_images", "max_queue", "max_images_per_request", "threads")
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
