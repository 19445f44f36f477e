"""Training the built-in discrete digit models with engine.builtin.training's loop (AdamW, warmup + cosine,
gradient clipping, EMA, resumable): one task object per model.

    python -m engine train --model digits-bae    --out runs/digits-bae    --seed 0   # the tokenizer
    python -m engine train --model digits-elm-ar --out runs/digits-elm-ar --seed 0   # ELM AR on its codes

  BAETask     the binary autoencoder of engine.builtin.discrete_digits on the train-split images:
              MSE between its [0, 1] reconstruction (Bernoulli bits, straight-through) and the
              image, plus a small penalty on p (1 - p) that pushes bit probabilities to 0 / 1,
              so that thresholding at encode time loses little.
  ELMARTask   an ELM AR transformer (engine.models.elm, the sampler's own module) by teacher
              forcing on the train-split codes: the class position and tokens 0..14 predict
              tokens 0..15, cross-entropy per sub-token; labels are replaced by the null class
              with probability `label_drop_prob` (what CFG reads at sampling time).
A masked (MLM) or coarse-to-fine task is another class beside these: `CodeBatches` gives its
batches of (codes, labels) from `digits_codes`, `drop_labels` its CFG dropout.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .discrete_digits import BAEConfig, DigitsBAE, digits_codes
from ..core.errors import ConfigError
from ..families.elm import ELMConfig

# The built-in models' settings ---------------------------------------------------------------
DIGITS_BAE_TRAINING = dict(steps=2000, batch_size=32, threads=1, warmup_steps=100)
BIT_PENALTY = 0.02          # weight of mean p (1 - p) in the BAE loss

DIGITS_ELM_AR = dict(dim=128, n_layer=4, n_head=4, multiple_of=64, token_each=2, code_dim=8,
                     num_classes=10, class_dropout_prob=0.1, block_size=16, cls_token_num=1)
DIGITS_ELM_AR_TRAINING = dict(steps=2000, batch_size=64, threads=1, warmup_steps=100)
# Chosen by the sweep in docs/digits-discrete (engine.builtin.evaluate classifier accuracy vs FD, seeds 1-2).
DIGITS_ELM_AR_SAMPLING = dict(cfg=1.5, cfg_schedule="constant", temperature=0.3, top_k=None, num_iter=16)


def digits_elm_ar_config(**overrides) -> ELMConfig:
    return ELMConfig.from_dict({**DIGITS_ELM_AR, **overrides})


# Shared pieces --------------------------------------------------------------------------------
class CodeBatches:
    """Epochs of a random permutation (drawn from the training generator) over a dataset of
    equal-length tensors; resumable through state() / load_state()."""

    def __init__(self, *tensors):
        self.tensors = tensors
        self.perm, self.cursor = None, 0

    def start(self, generator) -> None:
        self.perm, self.cursor = torch.randperm(len(self.tensors[0]), generator=generator), 0

    def state(self) -> dict:
        return {"perm": self.perm, "cursor": self.cursor}

    def load_state(self, state: dict) -> None:
        self.perm, self.cursor = state["perm"], state["cursor"]

    def next(self, batch_size: int, generator) -> tuple:
        if self.cursor + batch_size > len(self.perm):
            self.start(generator)
        idx = self.perm[self.cursor:self.cursor + batch_size]
        self.cursor += batch_size
        return tuple(t[idx] for t in self.tensors)


def drop_labels(labels: torch.Tensor, null_class: int, prob: float, generator) -> torch.Tensor:
    """Labels with each replaced by the CFG null class with probability `prob`."""
    drop = torch.rand(labels.shape, generator=generator) < prob
    return torch.where(drop, torch.full_like(labels, null_class), labels)


class BatchedTask:
    """start / state / load_state of engine.builtin.training's task protocol, from `self.batches`."""

    def start(self, generator) -> None:
        self.batches.start(generator)

    def state(self) -> dict:
        return self.batches.state()

    def load_state(self, state: dict) -> None:
        self.batches.load_state(state)


# The tasks ---------------------------------------------------------------------------------------
class BAETask(BatchedTask):
    name = "digits-bae"
    stat_names = ("mse", "bit_var")

    def __init__(self, config: BAEConfig, images=None):
        if images is None:
            from .digits import load_split
            images, _ = load_split("train", size=config.img_size)
        self.config, self.batches = config, CodeBatches(images)

    def build(self) -> DigitsBAE:
        return DigitsBAE(self.config)

    def init_weights(self, module: nn.Module) -> nn.Module:
        return module   # PyTorch's default initialisation of convolutions and embeddings

    def loss(self, model: DigitsBAE, tables, step: int, batch_size: int, generator, tc):
        (images,) = self.batches.next(batch_size, generator)
        recon, probs = model(images, generator)
        mse = F.mse_loss(recon, (images + 1) / 2)
        bit_var = (probs * (1 - probs)).mean()
        return mse + BIT_PENALTY * bit_var, {"mse": float(mse.detach()), "bit_var": float(bit_var.detach())}


class ELMARTask(BatchedTask):
    name = "digits-elm-ar"
    stat_names = ("ce", "accuracy")

    def __init__(self, config: ELMConfig, codes=None, labels=None, bae_path=None):
        if codes is None:
            codes, labels = digits_codes("train", bae_path)
        if codes.ndim != 3 or codes.shape[1:] != (config.block_size, config.token_each):
            raise ConfigError(f"codes of shape {list(codes.shape[1:])} do not fit the config (block_size "
                              f"{config.block_size}, token_each {config.token_each})")
        if int(codes.max()) >= config.vocab_size:
            raise ConfigError(f"codes reach {int(codes.max())} but code_dim {config.code_dim} allows "
                              f"0..{config.vocab_size - 1}")
        if not config.has_null_class:
            raise ConfigError("class_dropout_prob must be > 0: the CFG null class is trained by dropout")
        self.config, self.batches = config, CodeBatches(codes, labels)

    def build(self):
        from ..models.elm import ELMTransformer
        return ELMTransformer(self.config)

    @torch.no_grad()
    def init_weights(self, module: nn.Module) -> nn.Module:
        """N(0, 0.02) linears and embeddings (ELM's initializer_range), output heads at zero."""
        for m in module.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
        heads = module.output if isinstance(module.output, nn.ModuleList) else [module.output]
        for head in heads:
            nn.init.zeros_(head.weight)
        return module

    def loss(self, model, tables, step: int, batch_size: int, generator, tc):
        codes, labels = self.batches.next(batch_size, generator)
        labels = drop_labels(labels, self.config.num_classes, tc.label_drop_prob, generator)
        logits = model(codes[:, :-1], labels)                  # [B, 16 * T, V]: class pos + 15 tokens
        logits = logits.reshape(codes.shape[0], -1, self.config.vocab_size)
        target = codes.reshape(codes.shape[0], -1)
        ce = F.cross_entropy(logits.transpose(1, 2), target)
        accuracy = (logits.argmax(-1) == target).float().mean()
        return ce, {"ce": float(ce.detach()), "accuracy": float(accuracy)}


# Reconstruction quality of a BAE -----------------------------------------------------------------
@torch.no_grad()
def reconstruction_report(bae: DigitsBAE, split: str = "heldout") -> dict:
    """Classifier accuracy and Fréchet distance (engine.builtin.evaluate) of the BAE's reconstructions
    of a split's digits (encode -> threshold -> decode, through the engine's BAE decoder)."""
    from .discrete_digits import decoder_of, encode_digits
    from .digits import load_split
    from .evaluate import evaluate_samples, make_reference

    images, labels = load_split(split, size=bae.config.img_size)
    codes = encode_digits(images, bae)
    recon = decoder_of(bae).decode_indices(codes).clamp(0, 1) * 2 - 1
    ref = make_reference(bae.config.img_size, samples_per_class=50)
    m = evaluate_samples(ref, recon, labels)
    distinct = len({tuple(c.flatten().tolist()) for c in codes})
    return {"split": split, "count": len(labels), "accuracy": m["accuracy"], "per_class": m["per_class"],
            "fd": m["fd"], "real_vs_real_fd": ref.real_vs_real_fd, "real_vs_real_count": ref.floor_count,
            "pixel_mse_01": float(((recon - images) / 2).pow(2).mean()),
            "distinct_images": distinct, "distinct_tokens": int(torch.unique(codes.reshape(-1, codes.shape[-1]),
                                                                         dim=0).shape[0])}


# Command line (dispatched from engine.builtin.train) ----------------------------------------------
DISCRETE_MODELS = ("digits-bae", "digits-elm-ar")


def train_task(name: str, config, task, defaults: dict, args) -> tuple:
    """The shared part of the built-in code models' training commands: a TrainConfig from the
    model's `defaults` and the command's options, the parameter count line, and engine.builtin.training's
    loop with OUT/resume.pt when --resume-every is given. Returns (TrainConfig, train's result)."""
    from .training import TrainConfig, train

    tc = TrainConfig(**{**dataclasses.asdict(TrainConfig()), **defaults,
                        **{k: getattr(args, k) for k in ("steps", "batch_size", "threads", "warmup_steps",
                                                         "lr", "ema_decay", "log_every")
                           if getattr(args, k, None) is not None}, "seed": args.seed})
    n_params = sum(p.numel() for p in task.build().parameters())
    print(f"training {name}: {n_params / 1e6:.2f}M parameters, {tc.steps} steps of batch {tc.batch_size}, "
          f"seed {tc.seed}, {tc.threads} thread(s)", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    resume_every = getattr(args, "resume_every", 0) or 0
    result = train(config, tc, task=task, resume_path=out / "resume.pt" if resume_every else None,
                   resume_every=resume_every)
    return tc, result


def sampling_with(defaults: dict, args, names=("cfg", "temperature")) -> dict:
    """A model's recorded sampling defaults with the command's --cfg / --temperature / ... ."""
    return {**defaults, **{n: getattr(args, n) for n in names if getattr(args, n, None) is not None}}


def run(args) -> int:
    from ..loading import save_engine_dir
    from .training import _command_line
    from .discrete_digits import load_digits_bae, save_digits_bae

    out = Path(args.out)
    if args.model == "digits-bae":
        config, defaults = BAEConfig(), DIGITS_BAE_TRAINING
        task = BAETask(config)
        data = "sklearn digits, engine.digits train split (16 x 16)"
    else:
        config, defaults = digits_elm_ar_config(), DIGITS_ELM_AR_TRAINING
        bae_path = getattr(args, "bae", None)
        task = ELMARTask(config, bae_path=bae_path)
        data = f"codes of the engine.digits train split under {bae_path or 'the built-in digits-bae'}"
    tc, result = train_task(args.model, config, task, defaults, args)
    resume = out / "resume.pt"
    training = {**dataclasses.asdict(tc), "command": _command_line(args), "data": data,
                "final": result["history"][-1], "seconds": round(result["seconds"], 1), "weights": "ema"}
    if args.model == "digits-bae":
        bae = task.build()
        bae.load_state_dict(result["ema"])
        bae.eval().requires_grad_(False)
        report = reconstruction_report(bae)
        save_digits_bae(bae, out, {"training": training, "reconstruction": report})
        print(f"held-out reconstructions: classifier accuracy {report['accuracy']:.1%}, FD {report['fd']:.2f} "
              f"(real-vs-real floor {report['real_vs_real_fd']:.2f})")
    else:
        sampling = sampling_with(DIGITS_ELM_AR_SAMPLING, args)
        dtype = getattr(torch, getattr(args, "weights_dtype", "float32"))
        training["weights_dtype"] = str(dtype).removeprefix("torch.")
        save_engine_dir({k: v.to(dtype) for k, v in result["ema"].items()}, config, out,
                        {"sampling": sampling, "training": training})
        save_digits_bae(load_digits_bae(bae_path), out / "bae")   # the companion decoder of its tokens
    (out / "history.json").write_text(json.dumps(result["history"], indent=1) + "\n")
    resume.unlink(missing_ok=True)
    print(f"wrote {out} after {result['seconds']:.0f}s")
    return 0
