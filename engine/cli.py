"""Command line: `python -m engine sample | convert | evaluate | train`.

Every argument is checked before any sampling starts (output path writable, extension known,
counts positive, seed in range); a user error prints one line `error: ...` and exits 2, never a
traceback. Outputs are written to a temporary file and renamed, so no partial file is left."""
from __future__ import annotations

import argparse
import importlib
import sys

from .arguments import (add_config_argument, add_family_argument, add_setting_arguments,  # noqa: F401
                        check_decoder_arguments, check_output, config_overrides, write_atomically)
from .core.errors import EngineError

MAX_SEED = 2 ** 63 - 1


def positive(name: str, value: int) -> int:
    if value < 1:
        raise EngineError(f"{name} must be at least 1, got {value}")
    return value


def _sample(args) -> int:
    import numpy as np
    import torch

    import engine
    from .images import captioned_grid, labelled_grid

    out = check_output(args.out)
    positive("--batch-size", args.batch_size)
    positive("--per-class", args.per_class)
    if not 0 <= args.seed <= MAX_SEED:
        raise EngineError(f"--seed must be in [0, {MAX_SEED}], got {args.seed}")
    model = engine.load(args.checkpoint, device=args.device, backend=args.backend,
                        num_sampling_steps=args.steps, precision=args.precision, family=args.family,
                        **config_overrides(args.config))
    text_model = model.conditioning == "text"
    if text_model and args.classes is not None:
        raise EngineError("this is a text-to-image model: pass --prompt \"...\", not --classes")
    if not text_model and (args.prompt or args.text_encoder):
        raise EngineError("this is a class-conditional model: pass --classes, not --prompt")
    if not text_model and (args.height or args.width):
        raise EngineError("--height / --width are for text-to-image models")
    decodable = check_decoder_arguments(model, args.vae, args.bae, images_required=out.suffix != ".npz",
                                        tokens_instead="--out x.npz to save the tokens")
    vae = engine.load_vae(args.vae, device=args.device) if args.vae else None
    bae = engine.load_bae(args.bae, device=args.device) if args.bae else None
    settings = model.resolve_settings(num_iter=args.num_iter, cfg=args.cfg, cfg_schedule=args.cfg_schedule,
                                      temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                      fast=args.fast)
    if text_model:
        encoder = engine.load_text_encoder(args.text_encoder, max_length=model.config.max_length,
                                           device=args.device) if args.text_encoder else None
        conditions = [p for p in (args.prompt or []) for _ in range(args.per_class)]
        if not conditions:
            raise EngineError("pass --prompt \"...\" (one or more)")
    else:
        classes = args.classes if args.classes is not None else list(range(min(10, model.num_classes)))
        conditions = [c for c in classes for _ in range(args.per_class)]
    # Image i has its own generator seeded seed + i: the images do not depend on --batch-size.
    chunks = []
    for start in range(0, len(conditions), args.batch_size):
        batch = conditions[start:start + args.batch_size]
        generators = [torch.Generator().manual_seed((args.seed + start + i) % (MAX_SEED + 1))
                      for i in range(len(batch))]
        if text_model:
            texts = model.texts_for(batch, None, encoder, None)[0]
            tokens = model.sample_tokens(len(batch), texts=texts, height=args.height, width=args.width,
                                         progress=True, generator=generators, **settings)
        else:
            tokens = model.sample_tokens(len(batch), labels=batch, progress=True, generator=generators,
                                         **settings)
        chunks.append(tokens)
    tokens = torch.cat(chunks)
    images = model.decode(tokens, vae=vae, bae=bae).permute(0, 2, 3, 1).cpu().numpy() if decodable else None
    if out.suffix == ".npz":
        arrays = {"tokens": tokens.cpu().numpy(),
                  ("prompts" if text_model else "labels"): np.array(conditions)}
        if images is not None:
            arrays["images"] = images
        write_atomically(out, lambda tmp: np.savez(tmp, **arrays))
    else:
        scale = max(1, 256 // max(images.shape[1], images.shape[2]))
        grid = (captioned_grid(images, conditions, scale=scale) if text_model
                else labelled_grid(images, conditions, scale=scale))
        write_atomically(out, lambda tmp: grid.save(tmp, format="JPEG" if out.suffix.lower() != ".png" else "PNG"))
    what = f"{len(conditions)} samples of {len(args.prompt)} prompts" if text_model else \
        f"{len(conditions)} samples of classes {classes}"
    shown = ", ".join(f"{k} {v}" for k, v in settings.items() if v is not None)
    print(f"wrote {what} to {out} ({model.family}, backend {model.backend_name}, {shown})")
    return 0


def _convert(args) -> int:
    import engine

    out = engine.convert(args.input, args.output, ema=False if args.no_ema else None,
                         family=args.family, force=args.force, **config_overrides(args.config))
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="engine", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("sample", help="generate a PNG grid (or .npz) of samples")
    s.add_argument("--checkpoint", default="digits",
                   help="published .pth, engine model directory, or built-in name (default: digits)")
    add_family_argument(s)
    add_config_argument(s)
    s.add_argument("--vae", default=None, help="kl16.ckpt (MAR) or an AutoencoderKL directory (Fluid)")
    s.add_argument("--bae", default=None, help="ELM's binaryae_ema.th (binary-token models that ship none)")
    s.add_argument("--classes", type=int, nargs="+", default=None, help="class labels (default 0-9)")
    s.add_argument("--prompt", action="append", default=None,
                   help="text prompt (text-to-image models; repeat for several)")
    s.add_argument("--text-encoder", default=None, help="local Hugging Face T5 encoder directory")
    s.add_argument("--height", type=int, default=None, help="image height (text-to-image; default img_size)")
    s.add_argument("--width", type=int, default=None, help="image width (text-to-image; default img_size)")
    s.add_argument("--per-class", type=int, default=1,
                   help="samples per class or prompt (one grid row per class when > 1)")
    add_setting_arguments(s)
    s.add_argument("--steps", default=None, help="diffusion respacing: '100', 'ddim25', '10,5'")
    s.add_argument("--seed", type=int, default=0, help="image i is sampled with seed + i")
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--backend", default="auto", choices=["auto", "reference", "native", "triton"])
    s.add_argument("--device", default="cpu")
    s.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="fp32 keeps the published tokens; bf16 (CPU or CUDA) / fp16 (CUDA) are faster")
    s.add_argument("--out", default="samples.png", help=".png / .jpg grid or .npz arrays")
    s.set_defaults(func=_sample)

    c = sub.add_parser("convert", help="write a published checkpoint in the engine's format")
    c.add_argument("input")
    c.add_argument("output")
    c.add_argument("--no-ema", action="store_true",
                   help="take 'model' instead of the family's default ('model_ema' for MAR)")
    c.add_argument("--force", action="store_true", help="replace OUTPUT if it is a non-empty directory")
    add_family_argument(c)
    add_config_argument(c)
    c.set_defaults(func=_convert)

    # Each imports its optional dependencies only when run (a missing one is an `error:` line
    # naming the extra to install), so every command is always listed.
    for name in ("builtin.evaluate", "builtin.geneval", "builtin.train", "distributed", "serving"):
        importlib.import_module(f"engine.{name}").add_parser(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except EngineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:   # disk full, permissions changed under us, ...
        print(f"error: {err.strerror or err}: {err.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
