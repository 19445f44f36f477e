"""A LitServe `LitAPI` over the Scheduler: the same request body, answers and status codes as
engine.serving.http, served by LitServe.

    import litserve as ls
    from engine.serving.litserve_api import EngineLitAPI

    api = EngineLitAPI("digits", max_batch_images=32)        # api_path /v1/images/generations
    ls.LitServer(api, accelerator="auto").run(port=8000)

LitServe's own batching stays off (max_batch_size=1): the API is async (`enable_async=True`), so
one LitServe worker takes many requests at once and hands them to the engine's Scheduler, which
batches them step by step (images of different requests join and leave between plan steps).
One worker per device; `workers_per_device > 1` would load the model once per worker and split
the batch.
"""
from __future__ import annotations

import litserve as ls
from fastapi import HTTPException

from .scheduler import MAX_IMAGES_PER_REQUEST, Scheduler


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
        from .http import warm

        device = device if str(device).startswith("cuda") else "cpu"
        model = engine.load(self.checkpoint, device=device, **self.load_kwargs)
        vae = engine.load_vae(self.vae_path, device=device) if self.vae_path else None
        self.scheduler = Scheduler(model, vae=vae, **self.scheduler_kwargs)
        if self.warmup:
            warm(self.scheduler)

    async def decode_request(self, request, **kwargs):
        return request   # the body as LitServe decoded it (a dict); checked in predict

    async def predict(self, body, **kwargs):
        from .http import run_generation

        status, payload, headers = await run_generation(self.scheduler, body)
        if status != 200:
            raise HTTPException(status, detail=payload.get("error", payload), headers=headers or None)
        return payload

    async def encode_response(self, output, **kwargs):
        return output
