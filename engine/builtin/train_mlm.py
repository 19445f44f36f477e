"""Training the built-in masked model `digits-elm-mlm` (engine.families.elm_mlm, ELM's
`llama/mlm_model.py` Transformer) on the digits BAE codes with engine.builtin.training's loop.

    python -m engine train --model digits-elm-mlm --out runs/digits-elm-mlm --seed 0

The objective (MaskGIT's, what the family's `generate_cfg` reads back):
  * per sample u ~ U(0, 1), masking ratio r = cos(pi / 2 * u) and n = max(1, ceil(S * r)) of the
    S = block_size positions masked, chosen uniformly (the n smallest of per-position uniform
    keys); a masked position has all its token_each sub-tokens set to the mask id 2**code_dim,
    as sampling re-masks whole positions;
  * the class replaced by the null class `num_classes` with probability `label_drop_prob`
    (engine.builtin.train_discrete.drop_labels: what CFG reads at sampling time);
  * cross-entropy of the model's logits [B, S * token_each, 2**code_dim] on the masked
    positions' sub-tokens only (known sub-tokens are copied at sampling time, never predicted).
Batches come from engine.builtin.train_discrete.CodeBatches over `digits_codes("train")`.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.errors import ConfigError
from .train_discrete import BatchedTask, CodeBatches, drop_labels, sampling_with, train_task

# The built-in model's settings -------------------------------------------------------------------
# pos_type rope1d: under ELM's released rope2d the 2 sub-tokens of a masked position are identical
# rows at every layer and get identical logits (docs/elm_mlm.md), which capped the rope2d model
# at 83.6% accuracy / FD 300.
DIGITS_ELM_MLM = dict(dim=128, n_layer=4, n_head=4, multiple_of=64, token_each=2, code_dim=8,
                      num_classes=10, class_dropout_prob=0.1, block_size=16, cls_token_num=1,
                      mask_schtype="cos", pos_type="rope1d")
DIGITS_ELM_MLM_TRAINING = dict(steps=2000, batch_size=64, threads=1, warmup_steps=100)
# Chosen by a sweep with engine.builtin.evaluate's classifier, generator seed 1 (docs/digits-discrete/
# elm_mlm.json "sampling_sweep"): without guidance the model is already at ~98-100% accuracy and
# guidance only narrows the samples (FD up); a high temperature (the published one scales the
# confidence noise only: a more random unmasking order) gives the lowest FD.
DIGITS_ELM_MLM_SAMPLING = dict(cfg=1.0, cfg_schedule="constant", temperature=4.5, num_iter=8, top_k=None,
                               top_p=None)


def digits_elm_mlm_config(**overrides):
    from ..families.elm_mlm import ELMMLMConfig

    return ELMMLMConfig.from_dict({**DIGITS_ELM_MLM, **overrides})


# The objective --------------------------------------------------------------------------------------
def masked_counts(bsz: int, seq: int, generator=None) -> torch.Tensor:
    """Positions to mask per row [bsz]: max(1, ceil(seq * cos(pi / 2 * u))), u ~ U(0, 1)."""
    u = torch.rand(bsz, generator=generator, dtype=torch.float64)
    return torch.ceil(seq * torch.cos(math.pi / 2 * u)).to(torch.int64).clamp(1, seq)


def position_mask(bsz: int, seq: int, generator=None) -> torch.Tensor:
    """bool [bsz, seq]: `masked_counts` positions per row, uniformly chosen (the lowest ranks of
    per-position uniform keys)."""
    counts = masked_counts(bsz, seq, generator)
    keys = torch.rand(bsz, seq, generator=generator)
    ranks = keys.argsort(dim=1).argsort(dim=1)
    return ranks < counts[:, None]


def mlm_loss(module, codes: torch.Tensor, labels: torch.Tensor, masked: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """(cross-entropy on the masked positions' sub-tokens, statistics) of the masked transformer
    `module` for codes [B, S, T], (possibly dropped) labels [B] and the position mask [B, S]."""
    sub = masked.unsqueeze(-1).expand_as(codes)                       # [B, S, T]
    inputs = torch.where(sub, torch.full_like(codes, module.mask_id), codes)
    logits = module(inputs, labels)                                   # [B, S * T, V]
    picked = logits[sub.reshape(codes.shape[0], -1)]                  # [M, V]
    target = codes[sub]                                               # [M]
    ce = F.cross_entropy(picked, target)
    with torch.no_grad():
        accuracy = (picked.argmax(-1) == target).float().mean()
    return ce, {"ce": float(ce.detach()), "accuracy": float(accuracy)}


class ELMMLMTask(BatchedTask):
    """engine.builtin.training task: the MaskGIT objective above for an ELMMLMConfig on codes [N, S, T]."""

    name = "digits-elm-mlm"
    stat_names = ("ce", "accuracy")

    def __init__(self, config, codes=None, labels=None, bae_path=None):
        if codes is None:
            from .discrete_digits import digits_codes
            codes, labels = digits_codes("train", bae_path)
        if not isinstance(codes, torch.Tensor) or codes.is_floating_point() or codes.ndim != 3 \
                or tuple(codes.shape[1:]) != (config.block_size, config.token_each):
            raise ConfigError(f"codes must be integers [N, {config.block_size}, {config.token_each}] "
                              f"(block_size, token_each), got {list(getattr(codes, 'shape', []))}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= config.vocab_size):
            raise ConfigError(f"codes must be sub-tokens in 0..{config.vocab_size - 1} (code_dim {config.code_dim})")
        if labels is None or labels.shape != codes.shape[:1] or labels.numel() and (
                int(labels.min()) < 0 or int(labels.max()) >= config.num_classes):
            raise ConfigError(f"labels must be [N] classes in 0..{config.num_classes - 1}")
        if not config.has_null_class:
            raise ConfigError("class_dropout_prob must be > 0: the CFG null class is trained by dropout")
        self.config, self.batches = config, CodeBatches(codes, labels.to(torch.int64))

    def build(self):
        from ..models.elm_mlm import ELMMLMTransformer
        return ELMMLMTransformer(self.config)

    @torch.no_grad()
    def init_weights(self, module: nn.Module) -> nn.Module:
        """N(0, 0.02) linears and embeddings (ELM's initializer_range); the weights the forward
        never reads (pos_embed, proj, output heads) at zero, so the file shows they are unused."""
        for m in module.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(module.mlm_layer.fc.bias)
        unused = [module.pos_embed, *(module.output if isinstance(module.output, nn.ModuleList) else [module.output])]
        if hasattr(module, "proj"):
            unused.append(module.proj)
        for m in unused:
            nn.init.zeros_(m.weight)
            m.weight.requires_grad_(False)
        return module

    def loss(self, model, tables, step: int, batch_size: int, generator, tc):
        codes, labels = self.batches.next(batch_size, generator)
        labels = drop_labels(labels, self.config.num_classes, tc.label_drop_prob, generator)
        masked = position_mask(codes.shape[0], self.config.block_size, generator)
        return mlm_loss(model, codes, labels, masked)


# Command line (dispatched from engine.builtin.train) ----------------------------------------------
def run(args) -> int:
    """`python -m engine train --model digits-elm-mlm --out DIR [--bae BAE_DIR]`: train, write DIR
    as an engine directory (family elm-mlm) with the BAE it decodes with in DIR/bae."""
    from .discrete_digits import load_digits_bae, save_digits_bae
    from ..loading import save_engine_dir
    from .training import _command_line

    out, bae_path = Path(args.out), getattr(args, "bae", None)
    config = digits_elm_mlm_config()
    bae = load_digits_bae(bae_path)
    if bae.config.token_each != config.token_each or bae.config.code_dim != config.code_dim:
        raise ConfigError(f"the BAE's codes ({bae.config.token_each} x {bae.config.code_dim} bits) do not fit "
                          f"digits-elm-mlm ({config.token_each} x {config.code_dim})")
    task = ELMMLMTask(config, bae_path=bae_path)
    tc, result = train_task("digits-elm-mlm", config, task, DIGITS_ELM_MLM_TRAINING, args)
    resume = out / "resume.pt"
    sampling = sampling_with(DIGITS_ELM_MLM_SAMPLING, args, ("cfg", "temperature", "num_iter"))
    training = {**dataclasses.asdict(tc), "command": _command_line(args),
                "data": f"codes of the engine.digits train split under {bae_path or 'the built-in digits-bae'}",
                "objective": "MaskGIT: cos-schedule masking of whole positions, CE on the masked sub-tokens",
                "final": result["history"][-1], "seconds": round(result["seconds"], 1), "weights": "ema"}
    dtype = getattr(torch, getattr(args, "weights_dtype", None) or "float32")
    training["weights_dtype"] = str(dtype).removeprefix("torch.")
    save_engine_dir({k: v.to(dtype) for k, v in result["ema"].items()}, config, out,
                    {"sampling": sampling, "training": training})
    save_digits_bae(bae, out / "bae")         # the companion decoder of its tokens
    (out / "history.json").write_text(json.dumps(result["history"], indent=1) + "\n")
    resume.unlink(missing_ok=True)
    print(f"wrote {out} after {result['seconds']:.0f}s")
    return 0
