"""Command line: `python -m engine sample | convert | evaluate | train`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import EngineError


def _sample(args) -> int:
    import numpy as np
    import torch

    import engine
    from .images import labelled_grid

    model = engine.load(args.checkpoint, device=args.device, backend=args.backend,
                        num_sampling_steps=args.steps, precision=args.precision)
    vae = engine.load_vae(args.vae, device=args.device) if args.vae else None
    if model.config.tokenizer == "vae" and vae is None and not str(args.out).endswith(".npz"):
        raise EngineError("this model generates KL-16 latents: pass --vae kl16.ckpt, or --out x.npz "
                          "to save the latents")
    defaults = model.sampling_defaults
    args.cfg = defaults.get("cfg", 1.0) if args.cfg is None else args.cfg
    args.num_iter = defaults.get("num_iter", 64) if args.num_iter is None else args.num_iter
    args.temperature = defaults.get("temperature", 1.0) if args.temperature is None else args.temperature
    classes = args.classes if args.classes is not None else list(range(min(10, model.config.class_num)))
    labels = [c for c in classes for _ in range(args.per_class)]
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    chunks = []
    for start in range(0, len(labels), args.batch_size):
        batch = labels[start:start + args.batch_size]
        tokens = model.sample_tokens(len(batch), num_iter=args.num_iter, cfg=args.cfg,
                                     cfg_schedule=args.cfg_schedule, labels=batch,
                                     temperature=args.temperature, progress=True, generator=generator)
        chunks.append(tokens)
    tokens = torch.cat(chunks)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npz":
        arrays = {"tokens": tokens.cpu().numpy(), "labels": np.array(labels)}
        if vae is not None or model.config.tokenizer == "pixels":
            from .images import tokens_to_images
            arrays["images"] = tokens_to_images(model, tokens, vae).permute(0, 2, 3, 1).cpu().numpy()
        np.savez(out, **arrays)
    else:
        from .images import tokens_to_images
        images = tokens_to_images(model, tokens, vae).permute(0, 2, 3, 1).cpu().numpy()
        scale = max(1, 256 // images.shape[1])
        labelled_grid(images, labels, scale=scale).save(out)
    print(f"wrote {len(labels)} samples of classes {classes} to {out} "
          f"(backend {model.backend_name}, {args.num_iter} steps, cfg {args.cfg})")
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
    s.add_argument("--vae", default=None, help="kl16.ckpt for latent-token models")
    s.add_argument("--classes", type=int, nargs="+", default=None, help="class labels (default 0-9)")
    s.add_argument("--per-class", type=int, default=1, help="samples per class (one grid row per class when > 1)")
    s.add_argument("--num-iter", type=int, default=None, help="MAR steps (default: the model's, or 64)")
    s.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the model's, or 1)")
    s.add_argument("--cfg-schedule", default="linear", choices=["linear", "constant"])
    s.add_argument("--temperature", type=float, default=None, help="(default: the model's, or 1)")
    s.add_argument("--steps", default=None, help="diffusion respacing: '100', 'ddim25', '10,5'")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--backend", default="auto", choices=["auto", "reference", "native", "triton"])
    s.add_argument("--device", default="cpu")
    s.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="fp32 keeps the published tokens; bf16 (CPU or CUDA) / fp16 (CUDA) are faster")
    s.add_argument("--out", default="samples.png", help=".png grid or .npz arrays")
    s.set_defaults(func=_sample)

    c = sub.add_parser("convert", help="write a published checkpoint in the engine's format")
    c.add_argument("input")
    c.add_argument("output")
    c.add_argument("--no-ema", action="store_true", help="take 'model' instead of 'model_ema'")
    c.set_defaults(func=_convert)

    for name in ("evaluate", "train"):
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
