"""`python -m engine serve`: the HTTP service (engine.serving.http) for one model.

    python -m engine serve --checkpoint digits --host 127.0.0.1 --port 8000 --max-queue 256

The server listens at once; the model loads and warms up in the background (GET /health answers
503 until then). A checkpoint that fails to load stops the server with one `error: ...` line
and exit code 2. SIGTERM drains: new requests get 503, the admitted ones finish (at most
--drain-timeout seconds), then the server exits. API keys: --api-key (repeatable) or
ENGINE_API_KEYS (comma-separated). See docs/serving.md."""
from __future__ import annotations

import argparse

from ..arguments import (add_config_argument, add_family_argument, check_decoder_arguments, config_overrides,
                         set_threads)
from ..core.errors import EngineError
from .scheduler import MAX_IMAGES_PER_REQUEST

API_KEYS_ENV = "ENGINE_API_KEYS"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="serve a model over HTTP (OpenAI Images API shape)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="digits",
                   help="published .pth, engine model directory, or built-in name (default: digits)")
    add_family_argument(p)
    add_config_argument(p)
    p.add_argument("--vae", default=None, help="kl16.ckpt or an AutoencoderKL directory (latent models)")
    p.add_argument("--bae", default=None, help="ELM's binaryae_ema.th (binary-token models that ship none)")
    p.add_argument("--text-encoder", default=None, help="local T5 directory (text-to-image models)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-queue", type=int, default=256, help="requests that may wait (more get 429)")
    p.add_argument("--max-batch-images", type=int, default=32, help="images in flight at once")
    p.add_argument("--max-images", type=int, default=MAX_IMAGES_PER_REQUEST,
                   help=f"largest n of one request (default {MAX_IMAGES_PER_REQUEST})")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="default per-request deadline in seconds (504 past it)")
    p.add_argument("--steps", default=None, help="diffusion respacing: '100', 'ddim25', '10,5'")
    p.add_argument("--backend", default="auto", choices=["auto", "reference", "native", "triton"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-warmup", action="store_true", help="skip the warm-up request")
    p.add_argument("--model-name", default=None, help="the model id of /v1/models (default: --checkpoint)")
    p.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help=f"a key /v1/ accepts as 'Authorization: Bearer KEY' (repeatable; also {API_KEYS_ENV}, "
                        "comma-separated); none: no key needed")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (413 past it)")
    p.add_argument("--max-json-depth", type=int, default=16, help="deepest JSON nesting of a body (400 past it)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds SIGTERM waits for the admitted requests before exiting")
    p.add_argument("--reject-delay", type=float, default=0.05,
                   help="seconds a 429 / 503 refusal waits before it is sent (paces clients that retry at once)")
    p.add_argument("--priority-aging", type=float, default=10.0,
                   help="seconds of waiting that raise a request's priority by one")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=_serve)
    return p


def _serve(args) -> int:
    from pathlib import Path

    for name in ("max_queue", "max_batch_images", "max_images", "max_body_bytes", "max_json_depth"):
        if getattr(args, name) < 1:
            raise EngineError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not 0 <= args.port <= 65535:
        raise EngineError(f"--port must be in [0, 65535], got {args.port}")
    for name in ("timeout", "drain_timeout", "priority_aging"):
        if not getattr(args, name) > 0:
            raise EngineError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if not args.reject_delay >= 0:
        raise EngineError(f"--reject-delay must be >= 0, got {args.reject_delay}")
    api_keys = api_keys_of(args.api_key)
    from ..loading import BUILTIN_MODELS

    if args.checkpoint not in BUILTIN_MODELS and not Path(args.checkpoint).exists():
        raise EngineError(f"--checkpoint {args.checkpoint}: checkpoint not found")
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as err:
        raise EngineError(f"serving needs FastAPI, uvicorn and prometheus-client ({err.name} is "
                          "missing): pip install -e \".[serve]\"") from None
    import engine
    from .http import create_app, serve

    set_threads(args.threads)

    def loader():
        model = engine.load(args.checkpoint, device=args.device, backend=args.backend,
                            num_sampling_steps=args.steps, precision=args.precision, family=args.family,
                            **config_overrides(args.config))
        if args.text_encoder:
            model.text_encoder = engine.load_text_encoder(
                args.text_encoder, max_length=model.config.max_length, device=args.device)
        check_decoder_arguments(model, args.vae, args.bae)   # served answers are images
        if args.bae:   # the decoder of binary-token models that ship none
            model.bae = engine.load_bae(args.bae, device=args.device)
        vae = engine.load_vae(args.vae, device=args.device) if args.vae else None
        return model, vae

    holder = {}

    def on_failure(err):
        server = getattr(holder.get("app").state, "uvicorn_server", None)
        if server is not None:
            server.should_exit = True

    app = create_app(loader=loader, max_queue=args.max_queue,
                     max_batch_images=args.max_batch_images, max_images_per_request=args.max_images,
                     timeout=args.timeout, warmup=not args.no_warmup,
                     model_name=args.model_name or str(args.checkpoint), on_failure=on_failure,
                     api_keys=api_keys, max_body_bytes=args.max_body_bytes,
                     max_json_depth=args.max_json_depth, priority_aging=args.priority_aging,
                     reject_delay=args.reject_delay)
    holder["app"] = app
    configure_logging(args.log_level)
    code = serve(app, host=args.host, port=args.port, log_level=args.log_level, drain_timeout=args.drain_timeout)
    failed = app.state.engine.failed
    if failed is not None:
        raise EngineError(f"the model failed to load: {failed}")
    return code


def api_keys_of(given) -> list[str]:
    """--api-key values and ENGINE_API_KEYS (comma-separated), each stripped; an empty one refused."""
    import os

    keys = list(given) + [k for k in os.environ.get(API_KEYS_ENV, "").split(",") if k.strip()]
    keys = [k.strip() for k in keys]
    if any(not k or not k.isprintable() for k in keys):
        raise EngineError("--api-key: a key must be a non-empty printable string")
    return keys


def configure_logging(level: str) -> None:
    """engine.serving's lines on stderr: the access log as JSON lines, the rest as text."""
    import logging
    import sys

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("engine.serving")
    logger.setLevel(level.upper())
    if not logger.handlers:
        logger.addHandler(handler)
    logger.propagate = False
