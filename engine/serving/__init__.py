"""Serving: iteration-level batching across requests (`Scheduler`), an OpenAI-compatible HTTP
service (`engine.serving.http`, FastAPI + uvicorn: `python -m engine serve`; its pieces:
`schema` (the body, the OpenAPI document), `generation` (one request's answer, shared with the
adapters), `streaming` (server-sent events), `middleware` (request ids, limits, API keys, the
error shape, access logs), `errors`), and thin adapters for LitServe
(`engine.serving.litserve_api`) and Ray Serve (`engine.serving.ray_serve`). See docs/serving.md.

    from engine.serving import Scheduler, Request
    with Scheduler(engine.load("digits"), max_batch_images=32) as scheduler:
        result = scheduler.submit(Request(label=3, n=2, seed=0)).result()
        pngs = result.png()

Importing this package is light: FastAPI, LitServe and Ray are imported by their modules only.
"""
from __future__ import annotations

from .scheduler import (MAX_IMAGES_PER_REQUEST, MAX_SEED, DeadlineExceeded, GenerationResult,
                        QueueFullError, Request, RequestError, RequestFuture, Scheduler,
                        SchedulerClosed, ServingError, WorkerError)

__all__ = ["Scheduler", "Request", "GenerationResult", "RequestFuture", "ServingError", "RequestError",
           "QueueFullError", "DeadlineExceeded", "SchedulerClosed", "WorkerError",
           "MAX_IMAGES_PER_REQUEST", "MAX_SEED", "add_parser"]


def add_parser(subparsers):
    """The `serve` subcommand of `python -m engine` (engine/cli.py)."""
    from .command import add_parser as _add_parser

    return _add_parser(subparsers)
