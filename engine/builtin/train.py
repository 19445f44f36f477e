"""Training a small class-conditional MAR on pixel tokens with the MAR objective, using the
engine's own inference modules (`MAR.encode` / `MAR.decode`, `DiffusionHead`).

    python -m engine train --out DIR --seed 0 --steps 3000

The objective, as in "Autoregressive Image Generation without Vector Quantization":
  * a random generation order per image and a masking ratio drawn from a truncated Gaussian
    near 1 (left half of N(1, 0.25^2), cut at `mask_ratio_min`); every row of a batch masks the
    same number of tokens, so the fixed-shape index form of encode/decode applies;
  * label dropout (`fake_latent` instead of the class embedding with probability 0.1), which is
    what classifier-free guidance reads at sampling time;
  * the diffusion loss on the masked tokens only, each token's condition repeated
    `diffusion_batch_mul` times with independent timesteps and noise. The head predicts eps and
    the learned-range variance interpolation v; the loss is the MSE on eps plus the variational
    bound term for the variance with the eps prediction frozen (the improved-DDPM "hybrid"
    loss that the published `training_losses` computes with learn_sigma). Sampling reads the
    variance output, so it is trained exactly as the published model's is;
  * AdamW (betas 0.9/0.95, weight decay off for biases, norms and the head), gradient clipping,
    warmup then cosine learning rate, and an exponential moving average of the weights, which
    is what gets saved.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from ..arguments import check_threads
from ..families.causal import FAMILY_NAME as CAUSAL_FAMILY
from ..families.mar import FAMILY_NAME as MAR_FAMILY

from ..models.mar import MAR
from .training import DIGITS_MODEL, DIGITS_SAMPLING, TrainConfig, _command_line, digits_config, train


# Command line ---------------------------------------------------------------------------------
def _run(args) -> int:
    from ..loading import save_engine_dir
    from .train_discrete import DISCRETE_MODELS, run as run_discrete

    check_threads(args.threads, minimum=0)   # before anything is written; 0 keeps torch's setting
    if args.model in DISCRETE_MODELS:   # the BAE-token digit models: engine/builtin/train_discrete.py
        return run_discrete(args)
    if args.model == "digits-ctf":      # coarse-to-fine on the same codes: engine/builtin/train_ctf.py
        from .train_ctf import run as run_ctf
        return run_ctf(args)
    if args.model == "digits-elm-mlm":  # ELM's masked model on the same codes: engine/builtin/train_mlm.py
        from .train_mlm import run as run_mlm
        return run_mlm(args)

    overrides = {k: v for k, v in dict(
        img_size=args.img_size, patch_size=args.patch_size, encoder_embed_dim=args.width,
        decoder_embed_dim=args.width, encoder_depth=args.encoder_depth,
        decoder_depth=args.decoder_depth, encoder_num_heads=args.heads, decoder_num_heads=args.heads,
        buffer_size=args.buffer_size, diffloss_d=args.head_depth, diffloss_w=args.head_width,
        num_sampling_steps=args.sampling_steps).items() if v is not None}
    if args.family == CAUSAL_FAMILY:   # the continuous causal AR (digits-causal): engine/builtin/train_causal.py
        from .train_causal import setup as causal_setup

        config, task, defaults, training_defaults, data = causal_setup(args, overrides)
    elif args.model == "digits-text":
        from .train_text import (DIGITS_TEXT_SAMPLING, DIGITS_TEXT_TRAINING, TextCanvasTask,
                                 digits_text_config)
        from ..decoders.text import load_text_encoder
        from .digits_text import MAX_LENGTH, write_text_encoder

        if args.width is not None:
            overrides["cross_embed_dim"] = args.width
        if args.heads is not None:
            overrides["cross_num_heads"] = args.heads
        overrides.pop("buffer_size", None)   # Fluid has no buffer tokens
        config = digits_text_config(**overrides)
        # The frozen T5 is written first and read back as sampling reads it.
        encoder = load_text_encoder(write_text_encoder(Path(args.out) / "text_encoder"), MAX_LENGTH)
        task = TextCanvasTask(config, args.seed, encoder)
        defaults, training_defaults = DIGITS_TEXT_SAMPLING, DIGITS_TEXT_TRAINING
        data = "sklearn digits (engine.digits train split) composed on 16 x 32 canvases, engine.digits_text captions"
    else:
        config = digits_config(**overrides)
        task, defaults, data = None, DIGITS_SAMPLING, "sklearn digits, engine.digits train split"
        training_defaults = {}
    for name in ("cfg", "num_iter", "temperature"):
        if getattr(args, name) is None:
            setattr(args, name, defaults[name])
    for name, value in {**dataclasses.asdict(TrainConfig()), **training_defaults}.items():
        if getattr(args, name, 0) is None:
            setattr(args, name, value)
    tc = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                     warmup_steps=args.warmup_steps, ema_decay=args.ema_decay,
                     diffusion_batch_mul=args.diffusion_batch_mul, threads=args.threads,
                     log_every=args.log_every)
    module = task.build() if task is not None else MAR(config)
    n_params = sum(p.numel() for p in module.parameters())
    print(f"training a {n_params / 1e6:.2f}M-parameter {type(module).__name__} ({args.model}): "
          f"{config.token_dim}-value tokens of {config.patch_size}x{config.patch_size} pixels, "
          f"{tc.steps} steps of batch {tc.batch_size}, seed {tc.seed}", flush=True)
    extra = {"sampling": {"cfg": args.cfg, "num_iter": args.num_iter, "temperature": args.temperature}}

    def snapshot(step, state):
        save_engine_dir(state, config, Path(args.out) / f"step{step}", extra)

    Path(args.out).mkdir(parents=True, exist_ok=True)
    resume = Path(args.out) / "resume.pt"
    result = train(config, tc, on_snapshot=snapshot, snapshot_every=args.snapshot_every,
                   resume_path=resume if args.resume_every else None, resume_every=args.resume_every,
                   task=task)
    sampling = {"cfg": args.cfg, "num_iter": args.num_iter, "temperature": args.temperature}
    training = {**dataclasses.asdict(tc), "command": _command_line(args),
                "data": data,
                "final_loss": result["history"][-1]["loss"], "seconds": round(result["seconds"], 1),
                "weights": "ema"}
    dtype = getattr(torch, args.weights_dtype)
    ema = {k: v.to(dtype) for k, v in result["ema"].items()}
    training["weights_dtype"] = args.weights_dtype
    out = save_engine_dir(ema, config, args.out, {"sampling": sampling, "training": training})
    if args.save_raw:
        save_engine_dir(result["model"], config, Path(args.out) / "raw", {"sampling": sampling})
    (Path(args.out) / "history.json").write_text(json.dumps(result["history"], indent=1) + "\n")
    resume.unlink(missing_ok=True)
    print(f"wrote {out} (EMA weights) after {result['seconds']:.0f}s")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    d = DIGITS_MODEL
    p = subparsers.add_parser("train", help="train a built-in digits model from a seed (CPU, minutes)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from .train_discrete import DISCRETE_MODELS

    p.add_argument("--bae", default=None, help="discrete models: digits BAE directory whose codes to "
                   "train on (default: the built-in digits-bae)")
    p.add_argument("--model", default="digits", choices=["digits", "digits-text", *DISCRETE_MODELS, "digits-ctf",
                                                          "digits-elm-mlm"],
                   help="digits: class-conditional MAR; digits-text: text-to-image Fluid (16 x 32 canvases)")
    p.add_argument("--family", default=MAR_FAMILY, choices=[MAR_FAMILY, CAUSAL_FAMILY],
                   help="with --model digits: mar (the built-in 'digits') or causal (continuous causal AR, "
                        "'digits-causal')")
    p.add_argument("--out", required=True, help="engine model directory to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help=f"(default {TrainConfig.steps}; the model's)")
    p.add_argument("--batch-size", type=int, default=None, help=f"(default {TrainConfig.batch_size}; the model's)")
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--warmup-steps", type=int, default=TrainConfig.warmup_steps)
    p.add_argument("--ema-decay", type=float, default=TrainConfig.ema_decay)
    p.add_argument("--diffusion-batch-mul", type=int, default=None,
                   help=f"(default {TrainConfig.diffusion_batch_mul}; the model's)")
    p.add_argument("--threads", type=int, default=None,
                   help=f"torch CPU threads (default {TrainConfig.threads}; the model's; 0 keeps torch's setting)")
    p.add_argument("--log-every", type=int, default=TrainConfig.log_every)
    p.add_argument("--img-size", type=int, default=None, help=f"(default {d['img_size']})")
    p.add_argument("--patch-size", type=int, default=None, help=f"(default {d['patch_size']})")
    p.add_argument("--width", type=int, default=None, help=f"transformer width (default {d['encoder_embed_dim']})")
    p.add_argument("--heads", type=int, default=None, help=f"(default {d['encoder_num_heads']})")
    p.add_argument("--encoder-depth", type=int, default=None, help=f"(default {d['encoder_depth']})")
    p.add_argument("--decoder-depth", type=int, default=None, help=f"(default {d['decoder_depth']})")
    p.add_argument("--buffer-size", type=int, default=None, help=f"(default {d['buffer_size']})")
    p.add_argument("--head-depth", type=int, default=None, help=f"(default {d['diffloss_d']})")
    p.add_argument("--head-width", type=int, default=None, help=f"(default {d['diffloss_w']})")
    p.add_argument("--sampling-steps", default=None, help=f"diffusion respacing (default {d['num_sampling_steps']})")
    p.add_argument("--cfg", type=float, default=None, help="recorded sampling default (default: the model's)")
    p.add_argument("--num-iter", type=int, default=None, help="recorded sampling default (default: the model's)")
    p.add_argument("--temperature", type=float, default=None,
                   help="recorded sampling default (default: the model's)")
    p.add_argument("--weights-dtype", default="float16", choices=["float16", "float32"],
                   help="storage precision of the saved EMA weights (loaded as float32; default float16, "
                        "half the file size)")
    p.add_argument("--save-raw", action="store_true", help="also write the non-EMA weights to OUT/raw")
    p.add_argument("--snapshot-every", type=int, default=0, help="also write EMA snapshots to OUT/stepN")
    p.add_argument("--resume-every", type=int, default=100,
                   help="save the training state to OUT/resume.pt every N steps (0: never); a run "
                        "started again with the same options continues from it")
    p.set_defaults(func=_run)
    return p
