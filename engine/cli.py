"""Command line: `python -m engine sample | convert | evaluate | train`.

Every argument is checked before any sampling starts (output path writable, extension known,
counts positive, seed in range); a user error prints one line `error: ...` and exits 2, never a
traceback. Outputs are written to a temporary file and renamed, so no partial file is left."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from .core.errors import EngineError

OUTPUT_SUFFIXES = (".png", ".jpg", ".jpeg", ".npz")
MAX_SEED = 2 ** 63 - 1


def check_output(path: str) -> Path:
    """An output file whose directory exists and is writable, with a known extension."""
    out = Path(path)
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise EngineError(f"--out {path}: unknown extension {out.suffix or '(none)'!r}; use one of "
                          f"{', '.join(OUTPUT_SUFFIXES)}")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise EngineError(f"--out {path}: directory {parent} does not exist (create it first)")
    try:   # a real write, not os.access: root passes access checks on read-only file systems
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".engine-write-test.")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise EngineError(f"--out {path}: cannot write in directory {parent} ({err.strerror})") from None
    if out.is_dir():
        raise EngineError(f"--out {path} is a directory; give a file name")
    return out


def write_atomically(out: Path, write) -> None:
    """`write(tmp_path)` to a temporary file beside `out`, then rename it into place."""
    fd, tmp = tempfile.mkstemp(dir=out.parent if str(out.parent) else ".", prefix=f".{out.name}.",
                               suffix=out.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def positive(name: str, value: int) -> int:
    if value < 1:
        raise EngineError(f"{name} must be at least 1, got {value}")
    return value


def _sample(args) -> int:
    import numpy as np
    import torch

    import engine
    from .images import captioned_grid, labelled_grid, tokens_to_images

    out = check_output(args.out)
    positive("--batch-size", args.batch_size)
    positive("--per-class", args.per_class)
    if not 0 <= args.seed <= MAX_SEED:
        raise EngineError(f"--seed must be in [0, {MAX_SEED}], got {args.seed}")
    model = engine.load(args.checkpoint, device=args.device, backend=args.backend,
                        num_sampling_steps=args.steps, precision=args.precision, family=args.family)
    if getattr(model, "bae", None) is not None:   # BAE-token models decode with the BAE they ship
        return _sample_bae_model(args, model, out)
    text_model = model.family == "fluid"
    if text_model and args.classes is not None:
        raise EngineError("this is a text-to-image model: pass --prompt \"...\", not --classes")
    if not text_model and (args.prompt or args.text_encoder):
        raise EngineError("this is a class-conditional model: pass --classes, not --prompt")
    if not text_model and (args.height or args.width):
        raise EngineError("--height / --width are for text-to-image models")
    vae = engine.load_vae(args.vae, device=args.device) if args.vae else None
    if model.config.tokenizer == "vae" and vae is None and out.suffix != ".npz":
        raise EngineError("this model generates VAE latents: pass --vae (kl16.ckpt, or an "
                          "AutoencoderKL directory), or --out x.npz to save the latents")
    settings = engine.sampling_settings(model, num_iter=args.num_iter, cfg=args.cfg,
                                        cfg_schedule=args.cfg_schedule, temperature=args.temperature)
    if text_model:
        encoder = engine.load_text_encoder(args.text_encoder, max_length=model.config.max_length,
                                           device=args.device) if args.text_encoder else None
        prompts = [p for p in (args.prompt or []) for _ in range(args.per_class)]
        if not prompts:
            raise EngineError("pass --prompt \"...\" (one or more)")
        conditions = prompts
    else:
        encoder = None
        classes = args.classes if args.classes is not None else list(range(min(10, model.config.class_num)))
        conditions = [c for c in classes for _ in range(args.per_class)]
    # Image i has its own generator seeded seed + i: the images do not depend on --batch-size.
    chunks = []
    for start in range(0, len(conditions), args.batch_size):
        batch = conditions[start:start + args.batch_size]
        generators = [torch.Generator().manual_seed((args.seed + start + i) % (MAX_SEED + 1))
                      for i in range(len(batch))]
        if text_model:
            texts = engine._texts_for(model, batch, None, encoder, None)[0]
            tokens = model.sample_tokens(len(batch), texts=texts, height=args.height, width=args.width,
                                         progress=True, generator=generators, **settings)
        else:
            tokens = model.sample_tokens(len(batch), labels=batch, progress=True, generator=generators,
                                         **settings)
        chunks.append(tokens)
    tokens = torch.cat(chunks)
    decodable = vae is not None or model.config.tokenizer == "pixels"
    images = tokens_to_images(model, tokens, vae).permute(0, 2, 3, 1).cpu().numpy() if decodable else None
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
    what = f"{len(prompts)} samples of {len(args.prompt)} prompts" if text_model else \
        f"{len(conditions)} samples of classes {classes}"
    print(f"wrote {what} to {out} (backend {model.backend_name}, {settings['num_iter']} steps, "
          f"cfg {settings['cfg']})")
    return 0


def _sample_bae_model(args, model, out: Path) -> int:
    """`sample` for class-conditional models that ship their BAE (digits-elm-ar): engine.generate
    per batch, image i drawn with its own generator seeded seed + i."""
    import numpy as np
    import torch

    import engine
    from .images import labelled_grid

    if args.prompt or args.text_encoder or args.height or args.width or args.vae or args.steps:
        raise EngineError("this is a class-conditional model decoded by its own BAE: pass --classes "
                          "(not --prompt, --text-encoder, --height / --width, --vae or --steps)")
    classes = args.classes if args.classes is not None else list(range(min(10, model.config.num_classes)))
    conditions = [c for c in classes for _ in range(args.per_class)]
    chunks = []
    for start in range(0, len(conditions), args.batch_size):
        batch = conditions[start:start + args.batch_size]
        generators = [torch.Generator().manual_seed((args.seed + start + i) % (MAX_SEED + 1))
                      for i in range(len(batch))]
        chunks.append(engine.generate(model, batch, num_iter=args.num_iter, cfg=args.cfg,
                                      cfg_schedule=args.cfg_schedule, temperature=args.temperature,
                                      generator=generators, output_type="np"))
    images = np.concatenate(chunks)
    if out.suffix == ".npz":
        write_atomically(out, lambda tmp: np.savez(tmp, images=images, labels=np.array(conditions)))
    else:
        grid = labelled_grid(images, conditions, scale=max(1, 256 // max(images.shape[1], images.shape[2])))
        write_atomically(out, lambda tmp: grid.save(tmp, format="JPEG" if out.suffix.lower() != ".png" else "PNG"))
    print(f"wrote {len(conditions)} samples of classes {classes} to {out} ({model.family}, settings "
          f"{model.sampling_defaults or 'published defaults'} unless given)")
    return 0


def _convert(args) -> int:
    import engine

    out = engine.convert(args.input, args.output, ema=not args.no_ema)
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="engine", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("sample", help="generate a PNG grid (or .npz) of samples")
    s.add_argument("--checkpoint", default="digits",
                   help="published .pth, engine model directory, or built-in name (default: digits)")
    s.add_argument("--family", default=None, choices=["mar", "fluid"],
                   help="model family (default: recognised from the checkpoint)")
    s.add_argument("--vae", default=None, help="kl16.ckpt (MAR) or an AutoencoderKL directory (Fluid)")
    s.add_argument("--classes", type=int, nargs="+", default=None, help="class labels (default 0-9)")
    s.add_argument("--prompt", action="append", default=None,
                   help="text prompt (text-to-image models; repeat for several)")
    s.add_argument("--text-encoder", default=None, help="local Hugging Face T5 encoder directory")
    s.add_argument("--height", type=int, default=None, help="image height (text-to-image; default img_size)")
    s.add_argument("--width", type=int, default=None, help="image width (text-to-image; default img_size)")
    s.add_argument("--per-class", type=int, default=1,
                   help="samples per class or prompt (one grid row per class when > 1)")
    s.add_argument("--num-iter", type=int, default=None, help="MAR steps (default: the model's, or 64)")
    s.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the model's, or 1)")
    s.add_argument("--cfg-schedule", default=None, choices=["linear", "constant"],
                   help="(default: the model's, or linear)")
    s.add_argument("--temperature", type=float, default=None, help="(default: the model's, or 1)")
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
    c.add_argument("--no-ema", action="store_true", help="take 'model' instead of 'model_ema'")
    c.set_defaults(func=_convert)

    for name in ("builtin.evaluate", "builtin.geneval", "builtin.train", "distributed", "serving"):
        try:
            module = __import__(f"engine.{name}", fromlist=["add_parser"])
        except ImportError:
            continue
        module.add_parser(sub)
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
