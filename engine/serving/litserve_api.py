"""A LitServe `LitAPI` over the Scheduler: the same request body, answers, status codes and error
bodies as engine.serving.http, served by LitServe.

    from engine.serving.litserve_api import EngineLitAPI, server

    server(EngineLitAPI("digits", max_batch_images=32)).run(port=8000)   # /v1/images/generations
    # or from the shell (SIGTERM stops it and every worker process):
    python -m engine.serving.litserve_api --checkpoint digits --port 8000

`server(api, **litserver_kwargs)` is `litserve.LitServer` with the service's middleware in front
(engine.serving.middleware: X-Request-ID, the body size limit, API keys, every error in the
OpenAI shape, JSON access logs) and a JSON check that answers a body that is not JSON, or nests
too deep, with the plain server's 400 before LitServe reads it. `run(...)` (the module's
command line) makes SIGTERM shut LitServe down in full: its API-server and inference worker
processes end with it.

LitServe's own batching stays off (max_batch_size=1): the API is async (`enable_async=True`), so
one LitServe worker takes many requests at once and hands them to the engine's Scheduler, which
batches them step by step (images of different requests join and leave between plan steps).
One worker per device; `workers_per_device > 1` would load the model once per worker and split
the batch.
"""
from __future__ import annotations

import json

import litserve as ls
from fastapi import HTTPException

from .errors import ApiError
from .middleware import DEFAULT_MAX_BODY, ServingMiddleware, _answer
from .scheduler import MAX_IMAGES_PER_REQUEST, Scheduler
from .schema import MAX_JSON_DEPTH, parse_json


class EngineLitAPI(ls.LitAPI):
    """LitAPI for one model. `checkpoint`: what engine.load takes ("digits", a .pth, an engine
    directory); `load`: engine.load keywords; `vae`: a path for engine.load_vae (latent models);
    the rest configure the Scheduler."""

    def __init__(self, checkpoint: str = "digits", load: dict | None = None, vae: str | None = None,
                 max_batch_images: int = 32, max_queue: int = 256,
                 max_images_per_request: int = MAX_IMAGES_PER_REQUEST, timeout: float | None = 300.0,
                 api_path: str = "/v1/images/generations", warmup: bool = True):
        super().__init__(api_path=api_path, enable_async=True, max_batch_size=1)
        self.checkpoint, self.load_kwargs, self.vae_path = checkpoint, dict(load or {}), vae
        self.scheduler_kwargs = dict(max_batch_images=max_batch_images, max_queue=max_queue,
                                     max_images_per_request=max_images_per_request,
                                     default_timeout=timeout)
        self.warmup = warmup
        self.scheduler: Scheduler | None = None

    def setup(self, device):
        import engine
        from .generation import warm

        device = device if str(device).startswith("cuda") else "cpu"
        model = engine.load(self.checkpoint, device=device, **self.load_kwargs)
        vae = engine.load_vae(self.vae_path, device=device) if self.vae_path else None
        self.scheduler = Scheduler(model, vae=vae, **self.scheduler_kwargs)
        if self.warmup:
            warm(self.scheduler)

    async def decode_request(self, request, **kwargs):
        return request   # the body as LitServe decoded it (a dict); checked in predict

    async def predict(self, body, **kwargs):
        from .generation import run_generation

        status, payload, headers = await run_generation(self.scheduler, body)
        if status != 200:   # the middleware unwraps LitServe's {"detail": payload}
            raise HTTPException(status, detail=payload, headers=headers or None)
        return payload

    async def encode_response(self, output, **kwargs):
        return output


class JSONCheck:
    """Answers a POST body that is not JSON, or nests deeper than `max_depth`, as the plain
    server does (400 naming the problem) instead of LitServe's 500."""

    def __init__(self, app, max_depth: int = MAX_JSON_DEPTH):
        self.app, self.max_depth = app, max_depth

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        message = await receive()          # ServingMiddleware replays the whole body at once
        try:
            value = parse_json(message.get("body", b""), self.max_depth)
            if not isinstance(value, dict):
                raise ApiError(400, f"the body must be a JSON object, got {type(value).__name__}")
        except ApiError as err:
            return await _answer(send, err)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {**message, "body": json.dumps(value).encode()}
            return await receive()
        await self.app(scope, replay, send)


def server(api: EngineLitAPI, api_keys=(), max_body_bytes: int = DEFAULT_MAX_BODY,
           max_json_depth: int = MAX_JSON_DEPTH, **litserver_kwargs) -> ls.LitServer:
    """litserve.LitServer(api, ...) answering as engine.serving.http does (see the module)."""
    middlewares = list(litserver_kwargs.pop("middlewares", None) or [])
    middlewares += [(JSONCheck, {"max_depth": max_json_depth}),
                    (ServingMiddleware, {"max_body_bytes": max_body_bytes, "api_keys": tuple(api_keys)})]
    litserver_kwargs.setdefault("accelerator", "auto")
    litserver_kwargs["max_payload_size"] = None     # the size limit is ServingMiddleware's (413, OpenAI shape)
    return ls.LitServer(api, middlewares=middlewares, **litserver_kwargs)


def run(server_: ls.LitServer, **run_kwargs) -> None:
    """server_.run(...), with SIGTERM handled as Ctrl-C: LitServe then shuts down its uvicorn and
    inference worker processes (by default SIGTERM ends only this process and leaves them)."""
    import signal

    def interrupt(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)     # a second SIGTERM ends at once
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, interrupt)
    run_kwargs.setdefault("generate_client_file", False)
    server_.run(**run_kwargs)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m engine.serving.litserve_api", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="digits")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch-images", type=int, default=32)
    p.add_argument("--max-queue", type=int, default=256)
    p.add_argument("--steps", default=None, help="diffusion respacing (engine.load num_sampling_steps)")
    p.add_argument("--api-key", action="append", default=[])
    p.add_argument("--no-warmup", action="store_true")
    args = p.parse_args(argv)
    load = {"num_sampling_steps": args.steps} if args.steps else {}
    api = EngineLitAPI(args.checkpoint, load=load, max_batch_images=args.max_batch_images,
                       max_queue=args.max_queue, warmup=not args.no_warmup)
    run(server(api, api_keys=args.api_key, timeout=600), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
