"""Iteration-level batching of generation requests, for every family (Orca-style selective
batching; for the causal families continuous batching over KV-cache slots, as vLLM's).

    scheduler = engine.serving.Scheduler(engine.load("digits"), max_batch_images=32, max_queue=64)
    future = scheduler.submit(engine.serving.Request(label=3, n=4, seed=7))
    images = future.result().images("pil")          # == engine.generate(model, [3], generator=
                                                    #    [torch.Generator().manual_seed(7 + i)])
    result = await scheduler.submit_async(Request(label=1))   # from asyncio code

One background worker thread owns the model and its family's `Batcher` (model.batcher(); see
engine/core/protocol.py). Between any two steps finished images leave and waiting ones join (up
to `max_batch_images` images in flight); each iteration runs one `batcher.step` over every image
in flight: images at the same step shape share one transformer pass (masked families: the same
known / predicted counts; causal families: one decode pass over every KV-cache slot, each at its
own position, plus one prefill of the images that joined). Image i of a request with seed s is
sampled with its own generator `torch.Generator().manual_seed(s + i)` exactly as a batch of one
would be, so its tokens do not depend on what else is in flight: equal to
`engine.generate(model, [label], generator=[torch.Generator().manual_seed(s + i)], ...)` (CPU
float32: continuous tokens up to float rounding, ~1e-6 relative; discrete ones token for token).

Admission: a request whose images fit the free image slots (and no request waits for room)
joins the batch at the next step boundary without counting against the queue; `max_queue`
bounds only the requests that wait for room. Waiting requests are admitted by priority (higher
first; a request gains one level for every `priority_aging` seconds it waits, so none starves),
then first come, first served. A refusal is a few comparisons under a lock the step loop never
holds while it runs a step.

Every submitted request ends, with its result or an error: `QueueFullError` at submission when
`max_queue` requests already wait for room (nothing is queued then), `DeadlineExceeded` past
its deadline, `concurrent.futures.CancelledError` after `future.cancel()` (its images leave at
the next step), `WorkerError` when one of its images fails a step, `SchedulerClosed` when the
scheduler shuts down without draining or its worker dies. A failed step is retried by groups of
images at the same step shape, then image by image, each retry from the generators' states
before the step (the batcher's step changes nothing when it raises): only the request whose
image fails alone gets the error, the others go on with the images they would have had.
Requests are checked when submitted: a bad field raises `RequestError` naming the field.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import math
import secrets
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..core.protocol import SettingError
from ..core.errors import EngineError, SamplingError
from ..core.plan import check_count

MAX_SEED = 2 ** 63 - 1
MAX_IMAGES_PER_REQUEST = 16     # default cap on `n` (Scheduler(max_images_per_request=...))
MAX_PARTIAL_IMAGES = 3          # partial images a streamed request may ask for (OpenAI's bound)
MAX_PRIORITY = 1000             # |priority| bound
SETTINGS = ("num_iter", "cfg", "cfg_schedule", "temperature", "top_k", "top_p", "fast")   # Request fields


class ServingError(EngineError):
    """Base class of the serving errors."""


class RequestError(ServingError, ValueError):
    """A request field that cannot be honoured; `field` names it (the message starts with it)."""

    def __init__(self, field: str, message: str):
        super().__init__(message if message.startswith(field) else f"{field}: {message}")
        self.field = field

    def __reduce__(self):   # picklable (Ray, LitServe workers)
        return type(self), (self.field, str(self))


class QueueFullError(ServingError):
    """The scheduler's queue is full; the request was not queued. `retry_after`: seconds."""

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after

    def __reduce__(self):
        return type(self), (str(self), self.retry_after)


class DeadlineExceeded(ServingError, TimeoutError):
    """The request passed its deadline before its images were done; its work was dropped."""


class SchedulerClosed(ServingError):
    """The scheduler was shut down (or its worker stopped) before the request finished."""


class WorkerError(ServingError, RuntimeError):
    """A sampling step failed while the request was in flight (the cause is chained)."""


@dataclass
class Request:
    """One generation request: `n` images of one condition with shared settings.

    label: class label (class-conditional models; None: unconditional). prompt: text (text
    models; encoded by the scheduler's or the model's text encoder), or texts: the encoder's
    output [max_length, channels] (or [1, max_length, channels]). Settings left None take the
    model's recorded defaults (engine.sampling_settings), seed None a random seed (returned in
    the result). timeout: seconds from submission (None: the scheduler's default_timeout)."""
    label: int | None = None
    prompt: str | None = None
    texts: torch.Tensor | None = None
    n: int = 1
    num_iter: int | None = None
    cfg: float | None = None
    cfg_schedule: str | None = None
    temperature: float | None = None
    top_k: int | None = None        # binary-token families
    top_p: float | None = None
    # fast= mode (engine.core.fast; None: the model's default, exact). Per request: "disa"
    # images share batches with exact ones (grouped by head length); "lazy" and "speculative"
    # keep per-call state and are refused by the batcher (docs/fast.md).
    fast: object = None
    seed: int | None = None
    timeout: float | None = None
    request_id: str | None = None
    priority: int = 0               # higher first among requests waiting for room
    partial_images: int = 0         # previews to stream (Scheduler.submit(on_partial=...))


@dataclass
class GenerationResult:
    """What a request's future resolves to. `request` has every setting and the seed filled in."""
    request: Request
    tokens: torch.Tensor          # [n, ...], as model.sample_tokens returns them
    latency: float                # seconds from submission to the last image's last step
    _decode: object = dataclasses.field(default=None, repr=False)

    @property
    def seed(self) -> int:
        return self.request.seed

    def images(self, output_type: str = "np"):
        """The images as engine.generate returns them ("pil", "np" or "pt"): decoded by the
        scheduler's VAE (pixel models need none). Runs in the calling thread."""
        return self._decode(self.tokens, output_type)

    def png(self) -> list[bytes]:
        """Each image as PNG bytes (of the "pil" output)."""
        return encode_images(self.images("pil"))

    def encode(self, output_format: str = "png", compression: int | None = None) -> list[bytes]:
        """Each image as `output_format` bytes (see encode_images)."""
        return encode_images(self.images("pil"), output_format, compression)


OUTPUT_FORMATS = ("png", "jpeg", "webp")


def encode_images(images, output_format: str = "png", compression: int | None = None) -> list[bytes]:
    """PIL images as PNG (lossless: the pixels engine.generate gives), JPEG or WebP bytes.
    `compression` (0-100, the OpenAI field `output_compression`) is the JPEG / WebP quality
    (default 100, WebP's lossless mode at 100); PNG ignores it."""
    import io

    if output_format not in OUTPUT_FORMATS:
        raise RequestError(f"output_format must be one of {list(OUTPUT_FORMATS)}, got {output_format!r}",
                           "output_format")
    quality = 100 if compression is None else int(compression)
    options = {"png": {"format": "PNG"},
               "jpeg": {"format": "JPEG", "quality": quality},
               "webp": {"format": "WEBP", "quality": quality, "lossless": quality == 100}}[output_format]
    out = []
    for image in images:
        buf = io.BytesIO()
        image.save(buf, **options)
        out.append(buf.getvalue())
    return out


class RequestFuture(concurrent.futures.Future):
    """A concurrent.futures.Future with the resolved `request` (settings, seed) attached.
    `cancel()` works until the result is set, also while the images are in flight."""

    def __init__(self, request: Request):
        super().__init__()
        self.request = request


@dataclass(eq=False)
class _Job:
    request: Request
    future: RequestFuture
    submitted: float
    deadline: float | None
    condition: tuple | None = None    # (label, texts) of every image
    settings: dict | None = None
    admitted: int = 0             # images started
    finished: int = 0
    images: list = dataclasses.field(default_factory=list)   # finished images, by index
    slots: list = dataclasses.field(default_factory=list)   # its images in flight
    settled: bool = False
    fits: bool = False            # took free slots at submission (not counted in the queue)
    on_partial: object = None     # fn(image index, partial index, tokens) for streamed previews


class Scheduler:
    """Iteration-level scheduler over one model (see the module docstring).

    max_batch_images: images in flight at once (the batch every step runs). max_queue: requests
    that may wait for a slot (more are refused with QueueFullError). max_images_per_request:
    the largest `n`. default_timeout: seconds a request may take (None: unbounded). vae: the
    decoder of latent-token models (engine.load_vae); text_encoder: for prompts (default: the
    model's). admit_wait: after waking from idle the worker starts once no request arrived for
    this long (at most 10 x admit_wait), so that requests sent together start together. bae: the
    decoder of binary-token models that ship none (engine.load_bae). priority_aging: seconds of
    waiting that raise a request's priority by one (so a low priority never starves)."""

    def __init__(self, model, max_batch_images: int = 32, max_queue: int = 256,
                 max_images_per_request: int = MAX_IMAGES_PER_REQUEST,
                 default_timeout: float | None = None, vae=None, text_encoder=None,
                 admit_wait: float = 0.002, start: bool = True, bae=None, priority_aging: float = 10.0):
        if not callable(getattr(model, "batcher", None)):
            raise ServingError(f"the scheduler serves engine models (engine.load); got {type(model).__name__}")
        self.model = model
        self.max_batch_images = check_count("max_batch_images", max_batch_images, 65536)
        self.max_queue = check_count("max_queue", max_queue, 1 << 30)
        self.max_images_per_request = check_count("max_images_per_request", max_images_per_request, 65536)
        self.default_timeout = None if default_timeout is None else _check_timeout(default_timeout)
        self.vae, self.bae = vae, bae
        self.text_encoder = text_encoder
        self.admit_wait = float(admit_wait)
        if not (isinstance(priority_aging, (int, float)) and priority_aging > 0):
            raise ServingError(f"priority_aging must be > 0 seconds, got {priority_aging!r}")
        self.priority_aging = float(priority_aging)
        self.text_model = model.conditioning == "text"
        # Without a decoder the results hold tokens only (GenerationResult.images raises).
        self.decodable = {"pixels": True, "vae": vae is not None,
                          "bae": bae is not None or getattr(model, "bae", None) is not None}[model.decoder]
        self.batcher = model.batcher(self.max_batch_images)
        self._cv = threading.Condition()
        self._waiting: collections.deque[_Job] = collections.deque()
        self._active: list = []           # in-flight slots (worker thread only)
        self._in_flight = 0               # images in flight (read by metrics and submit)
        self._reserved = 0                # images of fitting requests not yet started
        self._room_waiters = 0            # requests waiting for room (the queue)
        self._closing = False
        self._abort = False
        self._alive = False
        self._death: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._step_listeners: list = []
        self._finish_listeners: list = []
        self._latency_ewma = None
        self._last_submit = 0.0
        self.counts = collections.Counter()   # submitted, rejected, completed, images, ...
        if start:
            self.start()

    # Lifecycle ---------------------------------------------------------------------------------
    def start(self) -> "Scheduler":
        with self._cv:
            if self._thread is not None:
                return self
            self._alive = True
            self._thread = threading.Thread(target=self._worker, name="engine-scheduler", daemon=True)
            self._thread.start()
        return self

    def close(self, wait: bool = True, cancel: bool = False, timeout: float | None = None) -> None:
        """Stop taking requests. `cancel=False` finishes the queued and in-flight ones first;
        `cancel=True` ends them now with SchedulerClosed. `wait` joins the worker."""
        with self._cv:
            self._closing = True
            self._abort = self._abort or cancel
            self._cv.notify_all()
            thread = self._thread
        if thread is None:            # never started: nothing will run the queue
            self._fail_all(SchedulerClosed("the scheduler was closed before it started"))
        elif wait:
            thread.join(timeout)

    shutdown = close

    def __enter__(self) -> "Scheduler":
        return self

    def __exit__(self, *exc) -> None:
        self.close(cancel=exc[0] is not None)

    @property
    def running(self) -> bool:
        return self._alive and not self._closing

    # Observability -----------------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        """Requests waiting for room (those that fit the free slots do not count)."""
        return self._room_waiters

    @property
    def full(self) -> bool:
        """A request now would be refused with QueueFullError (whatever its size: no slot is
        free to a newcomer while requests wait for room)."""
        return self._room_waiters >= self.max_queue

    @property
    def images_in_flight(self) -> int:
        return self._in_flight

    def add_step_listener(self, fn) -> None:
        """fn(seconds, images, rows, groups) after every iteration (from the worker thread):
        its duration, images in flight, predicted rows (the head call's size) and transformer
        passes (distinct step shapes)."""
        self._step_listeners.append(fn)

    def add_finish_listener(self, fn) -> None:
        """fn(status, seconds, images) when a request ends: "ok", "cancelled", "deadline",
        "error" (from the worker thread, or the closing one)."""
        self._finish_listeners.append(fn)

    def retry_after(self) -> float:
        """Seconds a refused client should wait: the queue ahead, at the recent request latency."""
        latency = self._latency_ewma or 1.0
        ahead = self.queue_depth + self._in_flight / self.max_batch_images
        return max(1.0, math.ceil(latency * max(ahead, 1.0) / max(self.max_batch_images, 1)))

    # Submission --------------------------------------------------------------------------------
    def resolve(self, request: Request) -> Request:
        """The request with every setting checked and filled in (raises RequestError)."""
        return _resolve(self, request)

    def submit(self, request: Request, on_partial=None) -> RequestFuture:
        """Queue a request; returns its future (GenerationResult). Raises RequestError for a bad
        field, QueueFullError when max_queue requests wait for room, SchedulerClosed after
        close(). `on_partial(image index, partial index, tokens)` is called from the worker with
        `request.partial_images` previews of each image at evenly spaced steps (the batcher's
        `preview`: its tokens so far), never after its last step."""
        request = self.resolve(request)
        future = RequestFuture(request)
        now = time.monotonic()
        deadline = None if request.timeout is None else now + request.timeout
        job = _Job(request, future, now, deadline, images=[None] * request.n, on_partial=on_partial)
        with self._cv:
            if self._closing or not self._alive:
                self.counts["rejected_closed"] += 1
                reason = f": worker stopped ({self._death!r})" if self._death else ""
                raise SchedulerClosed(f"the scheduler is not taking requests{reason}")
            free = self.max_batch_images - self._in_flight - self._reserved
            if self._room_waiters == 0 and request.n <= free:
                job.fits = True
                self._reserved += request.n
            elif self._room_waiters >= self.max_queue:
                self.counts["rejected_full"] += 1
                raise QueueFullError(f"the queue is full ({self.max_queue} requests waiting for room); "
                                     "retry later", retry_after=self.retry_after())
            else:
                self._room_waiters += 1
            self._waiting.append(job)
            self._last_submit = now
            self.counts["submitted"] += 1
            self._cv.notify_all()
        return future

    async def submit_async(self, request: Request) -> GenerationResult:
        """`await` the request's result; cancelling the awaiting task cancels the request."""
        return await asyncio.wrap_future(self.submit(request))

    def generate(self, request: Request, timeout: float | None = None) -> GenerationResult:
        """Submit and wait (blocking)."""
        return self.submit(request).result(timeout)

    # The worker --------------------------------------------------------------------------------
    def _worker(self) -> None:
        try:
            with torch.no_grad():
                while True:
                    with self._cv:
                        idle = not self._active
                        while not self._waiting and not self._active and not self._closing:
                            self._cv.wait()
                        if self._abort or (self._closing and not self._waiting and not self._active):
                            break
                    if idle and self.admit_wait > 0:
                        self._gather()
                    self._reap()
                    self._admit()
                    if self._active:
                        self._iterate()
        except BaseException as err:   # noqa: BLE001 - every request must still end
            self._death = err
        finally:
            with self._cv:
                self._alive = False
            error = SchedulerClosed("the scheduler shut down before the request finished") \
                if self._death is None else SchedulerClosed(f"the scheduler's worker stopped: {self._death!r}")
            if self._death is not None:
                error.__cause__ = self._death
            self._fail_all(error)

    def _gather(self) -> None:
        """After waking from idle: wait until no request arrived for `admit_wait` seconds (at
        most 10 x admit_wait, and not once the batch would be full), so that requests sent
        together start together and share every step."""
        start = time.monotonic()
        while time.monotonic() - start < 10 * self.admit_wait:
            with self._cv:
                waiting = sum(job.request.n - job.admitted for job in self._waiting)
                last = self._last_submit
            if waiting >= self.max_batch_images:
                return
            quiet = time.monotonic() - last
            if quiet >= self.admit_wait:
                return
            time.sleep(self.admit_wait - quiet)

    def _unqueue(self, job: _Job) -> None:
        """The job leaves the waiting list (started in full, or ended); the caller holds _cv."""
        if job not in self._waiting:
            return
        self._waiting.remove(job)
        if job.fits:
            self._reserved -= job.request.n - job.admitted
        else:
            self._room_waiters -= 1

    def _fail_all(self, error: BaseException) -> None:
        with self._cv:
            jobs = list(self._waiting)
            for job in jobs:
                self._unqueue(job)
        jobs += [slot.job for slot in self._active if slot.job not in jobs]
        self._active = []
        self._in_flight = 0
        for job in dict.fromkeys(jobs):
            self._settle(job, error=error, status="error")

    def _settle(self, job: _Job, result=None, error=None, status="ok") -> None:
        future = job.future
        if job.settled:
            return
        job.settled = True
        if not future.set_running_or_notify_cancel():
            status = "cancelled"
        elif error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
        self.counts[status] += 1
        seconds = time.monotonic() - job.submitted
        for fn in self._finish_listeners:
            _call(fn, status, seconds, job.request.n)

    def _drop(self, job: _Job) -> None:
        if job.slots:
            for slot in job.slots:
                self.batcher.release(slot.image)
            self._active = [s for s in self._active if s.job is not job]
            job.slots.clear()
            self._in_flight = len(self._active)

    def _reap(self) -> None:
        """Cancelled and expired requests leave (queued or in flight)."""
        now = time.monotonic()
        with self._cv:
            jobs = list(self._waiting)
        jobs += [s.job for s in self._active]
        for job in dict.fromkeys(jobs):
            cancelled = job.future.cancelled()
            expired = job.deadline is not None and now > job.deadline
            if not (cancelled or expired):
                continue
            with self._cv:
                self._unqueue(job)
            self._drop(job)
            if cancelled:
                self._settle(job, status="cancelled")
            else:
                self._settle(job, error=DeadlineExceeded(
                    f"the request passed its deadline ({job.request.timeout:g} s) with "
                    f"{job.finished} of {job.request.n} images done"), status="deadline")

    def _next_job(self) -> _Job | None:
        """The waiting job to start next: one that took free slots at submission, then one
        partly started, then the highest priority (aged: +1 per priority_aging seconds waited),
        then the oldest. The caller holds _cv."""
        if not self._waiting:
            return None
        now = time.monotonic()
        return min(self._waiting, key=lambda job: (
            not job.fits, job.admitted == 0,
            -(job.request.priority + (now - job.submitted) / self.priority_aging), job.submitted))

    def _admit(self) -> None:
        """Waiting images join while there is room (see _next_job for the order)."""
        while len(self._active) < self.max_batch_images:
            with self._cv:
                job = self._next_job()
                if job is None:
                    return
            request, started = job.request, 0
            try:
                if job.condition is None:
                    job.condition = self._condition(request)
                    job.settings = self.model.resolve_settings(**{k: getattr(request, k) for k in SETTINGS})
                while job.admitted < request.n and len(self._active) < self.max_batch_images:
                    seed = (request.seed + job.admitted) % (MAX_SEED + 1)
                    label, texts = job.condition
                    generator = torch.Generator().manual_seed(seed)
                    image = self.batcher.add(label=label, texts=texts, settings=job.settings, generator=generator)
                    slot = _Slot(job, job.admitted, image, generator, _preview_steps(image, request.partial_images))
                    job.slots.append(slot)
                    self._active.append(slot)
                    job.admitted += 1
                    started += 1
            except Exception as err:   # noqa: BLE001 - this request fails, the others go on
                with self._cv:
                    if job.fits:
                        self._reserved -= started
                    self._unqueue(job)
                    self._in_flight = len(self._active)
                self._drop(job)
                if isinstance(err, SettingError):
                    err = RequestError(err.setting, str(err))
                elif isinstance(err, SamplingError):
                    field = "prompt" if job.request.prompt is not None else "request"
                    err = RequestError(field, str(err))
                self._settle(job, error=err, status="error")
                continue
            with self._cv:    # the reservation becomes images in flight in one move
                if job.fits:
                    self._reserved -= started
                if job.admitted == request.n:
                    self._unqueue(job)
                self._in_flight = len(self._active)

    def _condition(self, request: Request) -> tuple:
        """(label, texts) of the request's images (a prompt encoded once, here)."""
        if not self.text_model:
            return request.label, None
        texts = request.texts
        if texts is None and request.prompt is not None:
            encoder = self.text_encoder or getattr(self.model, "text_encoder", None)
            texts = encoder([request.prompt])
        return None, texts

    def image_shape(self) -> tuple:
        """(H, W, C) of the images this scheduler returns."""
        return self.model.image_shape(vae=self.vae, bae=self.bae)

    def _iterate(self) -> None:
        slots = list(self._active)
        groups = len({s.image.shape_key for s in slots})   # transformer passes this iteration
        rows = sum(getattr(s.image, "predicting", 1) for s in slots)
        start = time.perf_counter()
        states = [s.generator.get_state() for s in slots]
        try:
            finished = self.batcher.step([s.image for s in slots])
            failed = []
        except Exception as err:   # noqa: BLE001 - find the image that fails; the others go on
            for slot, state in zip(slots, states):
                slot.generator.set_state(state)
            finished, failed = self._isolate(slots, err)
        seconds = time.perf_counter() - start
        for fn in self._step_listeners:
            _call(fn, seconds, len(slots), rows, groups)
        for slot, err in failed:
            job = slot.job
            if job.settled:
                continue
            error = WorkerError(f"a sampling step failed: {type(err).__name__}: {err}")
            error.__cause__ = err
            with self._cv:
                self._unqueue(job)
            self._drop(job)
            self._settle(job, error=error, status="error")
        done = {id(image) for image in finished}
        keep = []
        for slot in self._active:
            if id(slot.image) not in done:
                keep.append(slot)
                slot.steps += 1
                if slot.steps in slot.previews and slot.job.on_partial is not None:
                    self._preview(slot)
                continue
            job = slot.job
            job.images[slot.index] = slot.image
            job.slots.remove(slot)
            job.finished += 1
            if job.finished == job.request.n:
                self._complete(job)
        self._active = keep
        self._in_flight = len(keep)

    def _isolate(self, slots: list, first_error: BaseException) -> tuple[list, list]:
        """Retry a failed step: each group of images at one step shape, then each image of a
        group that failed (the batcher's step changes nothing when it raises; the generators
        are restored here). Returns (finished images, [(slot, error)] of the images that fail
        alone)."""
        if len(slots) == 1:
            return [], [(slots[0], first_error)]
        groups: dict = {}
        for slot in slots:
            groups.setdefault(slot.image.shape_key, []).append(slot)
        finished, failed = [], []
        for members in groups.values():
            if len(groups) > 1:      # one group alone is the step that failed
                err = self._retry(members, finished)
                if err is None:
                    continue
                if len(members) == 1:
                    failed.append((members[0], err))
                    continue
            for slot in members:
                err = self._retry([slot], finished)
                if err is not None:
                    failed.append((slot, err))
        return finished, failed

    def _retry(self, slots: list, finished: list):
        """One step of these images; the error (their generators restored) or None."""
        states = [s.generator.get_state() for s in slots]
        try:
            finished += self.batcher.step([s.image for s in slots])
        except Exception as err:   # noqa: BLE001
            for slot, state in zip(slots, states):
                slot.generator.set_state(state)
            return err
        return None

    def _preview(self, slot) -> None:
        try:
            tokens = self.batcher.preview([slot.image])
        except Exception:   # noqa: BLE001 - a preview is best effort; the image goes on
            return
        _call(slot.job.on_partial, slot.index, slot.previews.index(slot.steps), tokens)

    def _complete(self, job: _Job) -> None:
        try:
            tokens = self.batcher.tokens(job.images)
        except Exception as err:   # noqa: BLE001
            self._settle(job, error=err, status="error")
            return
        latency = time.monotonic() - job.submitted
        self._latency_ewma = latency if self._latency_ewma is None else 0.8 * self._latency_ewma + 0.2 * latency
        self.counts["images"] += job.request.n
        self._settle(job, result=GenerationResult(job.request, tokens, latency, self._decode))

    def png(self, tokens: torch.Tensor) -> list[bytes]:
        """PNG bytes of tokens (e.g. a preview's), as GenerationResult.png encodes images."""
        return encode_images(self._decode(tokens, "pil"))

    def encode(self, tokens: torch.Tensor, output_format: str = "png", compression: int | None = None):
        """`output_format` bytes of tokens (e.g. a preview's), as GenerationResult.encode gives."""
        return encode_images(self._decode(tokens, "pil"), output_format, compression)

    def _decode(self, tokens: torch.Tensor, output_type: str = "np"):
        from ..images import OUTPUT_TYPES, convert_output

        if output_type not in OUTPUT_TYPES:
            raise SamplingError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        return convert_output(self.model.decode(tokens, vae=self.vae, bae=self.bae), output_type)


@dataclass(eq=False)
class _Slot:
    job: _Job
    index: int
    image: object
    generator: torch.Generator
    previews: tuple = ()          # steps after which the image is previewed
    steps: int = 0                # steps done


def _preview_steps(image, partial_images: int) -> tuple:
    """`partial_images` steps evenly spaced inside the image's run (never its last step: then
    the image is complete); fewer when it has fewer steps."""
    total = image.num_steps
    return tuple(sorted({round(total * j / (partial_images + 1)) for j in range(1, partial_images + 1)}
                        & set(range(1, total))))


def _call(fn, *args) -> None:
    try:
        fn(*args)
    except Exception:   # noqa: BLE001 - a broken listener must not stop the worker
        pass


def _check_timeout(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(value) or value <= 0:
        raise RequestError("timeout", f"must be a finite number of seconds > 0, got {value!r}")
    return float(value)


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _resolve(scheduler: Scheduler, request: Request) -> Request:
    if not isinstance(request, Request):
        raise RequestError("request", f"expected an engine.serving.Request, got {type(request).__name__}")
    model = scheduler.model
    if scheduler.text_model:
        if request.label is not None:
            raise RequestError("class_label", "this is a text-to-image model: pass prompt, not class_label")
        if request.prompt is not None:
            if not isinstance(request.prompt, str) or not request.prompt.strip():
                raise RequestError("prompt", f"must be a non-empty string, got {request.prompt!r:.80}")
            if request.texts is not None:
                raise RequestError("prompt", "pass prompt or texts, not both")
            if (scheduler.text_encoder or getattr(model, "text_encoder", None)) is None:
                raise RequestError("prompt", "this server has no text encoder for prompts")
        if request.texts is not None:
            length, channels = model.text_shape
            t = request.texts
            if not isinstance(t, torch.Tensor) or tuple(t.shape[-2:]) != (length, channels) \
                    or t.dim() not in (2, 3) or (t.dim() == 3 and t.shape[0] != 1):
                raise RequestError("texts", f"must be a tensor [{length}, {channels}]")
    else:
        if request.prompt is not None or request.texts is not None:
            raise RequestError("prompt", "this is a class-conditional model: pass class_label, not prompt")
        if request.label is not None:
            num = model.num_classes
            if not _is_int(request.label):
                raise RequestError("class_label", f"must be an integer, got {request.label!r}")
            if not 0 <= request.label < num:
                raise RequestError("class_label", f"{request.label} is out of range: this model has "
                                   f"{num} classes (0..{num - 1})")
    n = request.n
    if not _is_int(n) or not 1 <= n <= scheduler.max_images_per_request:
        raise RequestError("n", f"must be an integer from 1 to {scheduler.max_images_per_request}, got {n!r}")
    try:
        settings = model.resolve_settings(**{k: getattr(request, k) for k in SETTINGS})
    except SettingError as err:
        raise RequestError(err.setting, str(err)) from None
    seed = request.seed
    if seed is None:
        seed = secrets.randbelow(MAX_SEED + 1)
    elif not _is_int(seed) or not 0 <= seed <= MAX_SEED:
        raise RequestError("seed", f"must be an integer in [0, {MAX_SEED}], got {seed!r}")
    for name, bound in (("priority", MAX_PRIORITY), ("partial_images", MAX_PARTIAL_IMAGES)):
        value = getattr(request, name)
        low = -bound if name == "priority" else 0
        if not _is_int(value) or not low <= value <= bound:
            raise RequestError(name, f"must be an integer from {low} to {bound}, got {value!r}")
    timeout = request.timeout if request.timeout is not None else scheduler.default_timeout
    if timeout is not None:
        timeout = _check_timeout(timeout)
    filled = {k: v for k, v in settings.items() if k in SETTINGS}
    return dataclasses.replace(request, n=int(n), seed=int(seed), timeout=timeout, **filled,
                               priority=int(request.priority), partial_images=int(request.partial_images),
                               label=None if request.label is None else int(request.label))
