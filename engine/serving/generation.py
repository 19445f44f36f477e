"""One POST /v1/images/generations, shared by the FastAPI app (engine.serving.http) and the
LitServe / Ray Serve adapters, so they answer every body alike: `admit` checks a raw body and
submits it (ApiError otherwise), `run_generation` waits for the images."""
from __future__ import annotations

import asyncio
import base64
import math
import re
import time

from .errors import ApiError
from .scheduler import (DeadlineExceeded, QueueFullError, Request, RequestError, Scheduler,
                        SchedulerClosed)
from .schema import MAX_JSON_DEPTH, ImageGenerationRequest, parse_body


def refuse_when_full(sched: Scheduler, metrics=None) -> None:
    """The cheap refusal (before the body is parsed): no newcomer can start while max_queue
    requests wait for room, so a retry flood costs a few comparisons per request."""
    if sched.full:
        if metrics is not None:
            metrics.rejections.labels("queue_full").inc()
        raise ApiError(429, f"the queue is full ({sched.max_queue} requests waiting for room); retry later",
                       headers={"Retry-After": str(int(math.ceil(sched.retry_after())))})


def admit(sched: Scheduler | None, raw, *, metrics=None, max_depth: int = MAX_JSON_DEPTH,
          draining: bool = False, request_id: str | None = None, on_partial=None, check_only: bool = False,
          streaming: bool = False):
    """(checked body, resolved request, future) of a raw body; ApiError 400 / 429 / 503.
    `check_only`: only the refusals that need no body (draining, not ready, the queue full).
    `streaming`: the caller answers `stream: true` with server-sent events (else 400)."""
    def count(name, label=None):
        if metrics is not None:
            metric = getattr(metrics, name)
            (metric.labels(label) if label else metric).inc()

    if draining:
        count("rejections", "draining")
        raise ApiError(503, "the server is draining (shutting down); retry on another replica",
                       code="server_draining", headers={"Retry-After": "5"})
    if sched is None or not sched.running:
        count("rejections", "not_ready")
        raise ApiError(503, "the model is not ready (loading, failed or shutting down)",
                       code="model_not_ready", headers={"Retry-After": "1"})
    refuse_when_full(sched, metrics)
    if check_only:
        return None
    try:
        body = parse_body(raw, max_depth)
        if body.stream and not streaming:
            raise ApiError(400, "stream: this endpoint answers JSON only; `engine serve` and the "
                                "Ray Serve adapter stream",
                           "stream", code="unsupported_value")
        request = to_request(body, sched, request_id)
        future = sched.submit(request, on_partial=on_partial if body.stream else None)
    except ApiError:
        count("invalid")
        raise
    except RequestError as err:
        count("invalid")
        raise ApiError(400, str(err), err.field) from None
    except QueueFullError as err:
        count("rejections", "queue_full")
        raise ApiError(429, str(err), headers={"Retry-After": str(int(math.ceil(err.retry_after)))}) from None
    except SchedulerClosed as err:
        count("rejections", "closed")
        raise ApiError(503, str(err), headers={"Retry-After": "1"}) from None
    return body, future.request, future


async def wait(future, disconnected=None):
    """The request's GenerationResult; ApiError 499 (the client went away: the request is
    cancelled), 504, 503, 400 or 500 otherwise."""
    waiter = asyncio.wrap_future(future)
    if disconnected is not None:
        watcher = asyncio.ensure_future(disconnected)
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
            raise ApiError(499, "the client closed the connection")
    try:
        return await waiter
    except DeadlineExceeded as err:
        raise ApiError(504, str(err)) from None
    except asyncio.CancelledError:
        if not future.cancelled():
            raise      # the serving task itself was cancelled
        raise ApiError(503, "the request was cancelled", headers={"Retry-After": "1"}) from None
    except SchedulerClosed as err:
        raise ApiError(503, str(err), headers={"Retry-After": "1"}) from None
    except RequestError as err:
        raise ApiError(400, str(err), err.field) from None
    except Exception as err:   # noqa: BLE001 - its image failed a step: 500 with the message
        raise ApiError(500, f"{type(err).__name__}: {err}") from None


async def run_generation(sched: Scheduler | None, raw, metrics=None, disconnected=None, *,
                         max_depth: int = MAX_JSON_DEPTH, draining: bool = False,
                         request_id: str | None = None) -> tuple[int, dict, dict]:
    """One non-streamed generation: (status, JSON payload, headers); status 499 when the client
    went away. `disconnected`: an awaitable that completes when the client goes away."""
    try:
        try:
            body, _, future = admit(sched, raw, metrics=metrics, max_depth=max_depth, draining=draining,
                                    request_id=request_id)
            waiting, disconnected = disconnected, None
            result = await wait(future, waiting)
        except ApiError as err:
            return err.status, err.payload, err.headers
        output_format = body.output_format or "png"
        encoded = await asyncio.to_thread(result.encode, output_format, body.output_compression)
        return 200, response_body(result, encoded, output_format, image_size(sched)), {}
    finally:
        if asyncio.iscoroutine(disconnected):
            disconnected.close()   # never awaited: answered before waiting


def response_body(result, encoded: list[bytes], output_format: str = "png", size: str | None = None) -> dict:
    """The OpenAI ImagesResponse (created, data, background, output_format, quality, size) plus
    the engine's seed and resolved settings."""
    seed = result.request.seed
    return {"created": int(time.time()),
            "data": [{"b64_json": base64.b64encode(p).decode("ascii"), "seed": seed + i}
                     for i, p in enumerate(encoded)],
            "background": "opaque", "output_format": output_format, "quality": "auto", "size": size,
            "seed": seed, "settings": settings_of(result.request)}


async def wait_for_disconnect(http) -> None:
    """Returns when the client disconnects (the body has been read: the next ASGI message is the
    disconnect)."""
    while True:
        message = await http.receive()
        if message["type"] == "http.disconnect":
            return


def to_request(body: ImageGenerationRequest, sched: Scheduler, request_id: str | None = None) -> Request:
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
            if not re.fullmatch(r"\s*[0-9]{1,18}\s*", prompt):
                raise RequestError("prompt", "this is a class-conditional model: pass class_label "
                                   f"(0..{classes - 1}), or a class number as the prompt; got {prompt!r:.60}")
            label = int(prompt)
            if label >= classes:
                raise RequestError("prompt", f"class {label} is out of range: this model has {classes} "
                                   f"classes (0..{classes - 1})")
        prompt = None
    if body.size is not None and body.size not in (image_size(sched), "auto"):
        raise RequestError("size", f"this model generates {image_size(sched)} images, got {body.size!r:.40}")
    return Request(label=label, prompt=prompt, n=body.n, num_iter=body.num_iter,
                   cfg=body.cfg, cfg_schedule=body.cfg_schedule, temperature=body.temperature,
                   top_k=body.top_k, top_p=body.top_p, fast=body.fast, seed=body.seed, timeout=body.timeout, request_id=request_id,
                   priority=body.priority or 0, partial_images=(body.partial_images or 0) if body.stream else 0)


def image_size(sched: Scheduler) -> str:
    height, width, _ = sched.image_shape()
    return f"{width}x{height}"


def settings_of(request: Request) -> dict:
    settings = {"num_iter": request.num_iter, "cfg": request.cfg, "cfg_schedule": request.cfg_schedule,
                "temperature": request.temperature, "n": request.n}
    settings.update({k: getattr(request, k) for k in ("top_k", "top_p", "fast") if getattr(request, k) is not None})
    return settings


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
