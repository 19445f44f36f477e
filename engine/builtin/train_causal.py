"""Training the built-in continuous causal AR model "digits-causal" (engine.models.causal) on the
same digits data as the built-in MAR, with engine.builtin.training's loop:

    python -m engine train --family causal --out DIR --seed 0

The objective is the AR one of "Autoregressive Image Generation without Vector Quantization"
(its AR baseline): teacher forcing over the generation order (raster by default) with causal
attention, and the diffusion loss of engine.builtin.training (MSE on eps + the variational bound for the
variance, each token's condition repeated `diffusion_batch_mul` times) on *every* position, since
every position is predicted from the ones before it. Label dropout (`fake_latent` for the class
with probability `label_drop_prob`) trains the CFG null class. AdamW, warmup + cosine, EMA, and
the initialisation are the digits MAR's (engine.builtin.training); the position tables start at N(0, 0.02).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..core.errors import ConfigError
from ..families.causal import PRESETS, CausalConfig
from ..models.causal import CausalAR
from ..models.mar import patchify
from .training import DigitsTask, diffusion_loss

DIGITS_CAUSAL_MODEL = PRESETS["causal_digits"]
DIGITS_CAUSAL_SAMPLING = dict(cfg=3.0, num_iter=16, temperature=1.0)
# What differs from engine.builtin.training.TrainConfig's defaults (the digits MAR's): batches of 64 with two
# diffusion draws per token keep a step at ~0.25 CPU-seconds (all 16 positions carry the loss);
# one thread makes the run reproducible bit for bit on the shared 2-core machine.
DIGITS_CAUSAL_TRAINING = dict(steps=2000, batch_size=64, diffusion_batch_mul=2, threads=1)


def digits_causal_config(**overrides) -> CausalConfig:
    return CausalConfig.from_dict({**DIGITS_CAUSAL_MODEL, **overrides})


def causal_loss(model: CausalAR, tables, images, labels, generator=None, label_drop_prob: float = 0.1,
                diffusion_batch_mul: int = 4):
    """The AR training loss of a batch `images [B, C, H, W]` (token range), `labels [B]`.
    Returns (loss, stats dict of floats)."""
    c = model.config
    tokens = patchify(images, c.patch_size)                        # [B, L, C]
    bsz, _, dim = tokens.shape
    order = torch.tensor(c.generation_order, dtype=torch.int64)
    start = model.class_emb(labels)
    drop = torch.rand(bsz, generator=generator) < label_drop_prob
    start = torch.where(drop.unsqueeze(-1), model.fake_latent.expand(bsz, -1), start)
    z = model(start, tokens, order)                                # z[:, s] predicts order[s]
    target = tokens.index_select(1, order)
    loss, mse, vb = diffusion_loss(model.diffloss.net, tables, target.reshape(-1, dim),
                                   z.reshape(-1, z.shape[-1]), generator, repeat=diffusion_batch_mul)
    return loss.mean(), {"mse": float(mse.detach().mean()), "vb": float(vb.detach().mean())}


class CausalDigitsTask(DigitsTask):
    """The digits MAR's data and batches (engine.builtin.training.DigitsTask) with the causal model and loss."""

    name = "digits-causal"

    def build(self) -> CausalAR:
        model = CausalAR(self.config)
        # engine.builtin.training.init_weights sets everything else; these tables are this family's own.
        nn.init.normal_(model.pos_embed_learned, std=0.02)
        nn.init.normal_(model.target_pos_embed_learned, std=0.02)
        return model

    def loss(self, model, tables, step: int, batch_size: int, generator, tc):
        if self.cursor + batch_size > len(self.images):
            self.perm, self.cursor = torch.randperm(len(self.images), generator=generator), 0
        idx = self.perm[self.cursor:self.cursor + batch_size]
        self.cursor += batch_size
        return causal_loss(model, tables, self.images[idx], self.labels[idx], generator,
                           tc.label_drop_prob, tc.diffusion_batch_mul)


# MAR options of `engine train` and the causal fields they set; the MAR-only ones are refused.
_RENAMED = {"encoder_embed_dim": "embed_dim", "encoder_num_heads": "num_heads"}
_MAR_ONLY = {"decoder_embed_dim", "decoder_num_heads", "buffer_size"}


def setup(args, overrides: dict):
    """(config, task, sampling defaults, training defaults, data description) of
    `engine train --family causal`, from the parsed options and their MAR-named overrides."""
    if args.model != "digits":
        raise ConfigError(f"--family causal trains the class-conditional digits (--model digits), "
                          f"not {args.model!r}")
    given = [k for k in ("encoder_depth", "decoder_depth", "buffer_size")
             if getattr(args, k, None) is not None]
    if given:
        raise ConfigError(f"--{given[0].replace('_', '-')} is a MAR option; a causal model has one stack "
                          f"of blocks (its depth is {DIGITS_CAUSAL_MODEL['depth']})")
    values = {_RENAMED.get(k, k): v for k, v in overrides.items()
              if k not in _MAR_ONLY and k not in ("encoder_depth", "decoder_depth")}
    config = digits_causal_config(**values)
    return (config, CausalDigitsTask(config), DIGITS_CAUSAL_SAMPLING, DIGITS_CAUSAL_TRAINING,
            "sklearn digits, engine.digits train split")
