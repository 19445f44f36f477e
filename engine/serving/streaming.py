"""`stream: true`: server-sent events as the OpenAI Images API streams them.

    event: image_generation.partial_image
    data: {"type": "image_generation.partial_image", "b64_json": ..., "partial_image_index": 0, ...}

    event: image_generation.completed
    data: {"type": "image_generation.completed", "b64_json": ..., "usage": {...}, ...}

`partial_images` (0-3) previews of each image, at evenly spaced steps of its run: the decode of
its tokens so far (the batcher's `preview`: masked families show the tokens unmasked so far,
causal ones the prefix; the rest is the family's blank, see each family's `preview`). An image
with fewer steps than that sends fewer previews (as the OpenAI API may). Then one
`image_generation.completed` per image, in index order, whose bytes are the non-streamed answer's
(PNG, or the request's `output_format`).
Every event carries `image_index` (which of the `n` images) and `seed`. An error after the
stream began is one `event: error` with the OpenAI error object, and the stream ends."""
from __future__ import annotations

import asyncio
import base64
import json
import time

from .errors import ApiError
from .generation import admit, image_size, wait


def sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


async def events(sched, request, future, partials: asyncio.Queue, disconnected=None,
                 output_format: str = "png", compression: int | None = None):
    """The event stream of one admitted request; `partials` receives (image index, partial
    index, tokens) from the scheduler's worker. Previews and images in `output_format`."""
    size = image_size(sched)
    common = {"background": "opaque", "output_format": output_format, "quality": "auto", "size": size}
    done = asyncio.ensure_future(wait(future, disconnected))

    async def partial_event(index, partial_index, tokens) -> bytes:
        image = (await asyncio.to_thread(sched.encode, tokens, output_format, compression))[0]
        return sse("image_generation.partial_image", {
            "type": "image_generation.partial_image", "b64_json": base64.b64encode(image).decode("ascii"),
            "created_at": int(time.time()), "partial_image_index": partial_index,
            "image_index": index, "seed": request.seed + index, **common})
    try:
        while not done.done():
            getter = asyncio.ensure_future(partials.get())
            await asyncio.wait({done, getter}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                await asyncio.wait({getter})
            if getter.done() and not getter.cancelled():
                yield await partial_event(*getter.result())
        while not partials.empty():       # previews queued before the request ended
            yield await partial_event(*partials.get_nowait())
        try:
            result = done.result()
        except ApiError as err:
            if err.status != 499:
                yield sse("error", {"type": "error", **err.payload})
            return
        encoded = await asyncio.to_thread(result.encode, output_format, compression)
        tokens = int(result.tokens[0].numel())
        for index, image in enumerate(encoded):
            yield sse("image_generation.completed", {
                "type": "image_generation.completed", "b64_json": base64.b64encode(image).decode("ascii"),
                "created_at": int(time.time()), "image_index": index, "seed": request.seed + index,
                "usage": {"input_tokens": 0, "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
                          "output_tokens": tokens, "total_tokens": tokens}, **common})
    finally:
        if not done.done():
            future.cancel()
            done.cancel()


def partial_queue(loop: asyncio.AbstractEventLoop):
    """(queue, on_partial): on_partial is called by the scheduler's worker thread."""
    queue: asyncio.Queue = asyncio.Queue()

    def on_partial(index, partial_index, tokens):
        loop.call_soon_threadsafe(queue.put_nowait, (index, partial_index, tokens))
    return queue, on_partial


def wants_stream(raw: bytes) -> bool:
    """Whether a body asks for server-sent events (a cheap look; admit's full check follows)."""
    if b'"stream"' not in raw:
        return False
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        return False
    return isinstance(data, dict) and data.get("stream") is True


def open_stream(sched, raw, **admit_options):
    """Admit a `stream: true` body (ApiError as `admit` raises them); returns
    `run(disconnected=None)`, the request's event stream (an async iterator of SSE chunks), for
    engine serve and the Ray Serve adapter alike."""
    queue, on_partial = partial_queue(asyncio.get_running_loop())
    checked, request, future = admit(sched, raw, on_partial=on_partial, streaming=True, **admit_options)

    def run(disconnected=None):
        return events(sched, request, future, queue, disconnected, checked.output_format or "png",
                      checked.output_compression)
    return run
