"""Training the built-in text-to-image model "digits-text": a small Fluid (engine.models.fluid,
LightGen's FLUID structure) on the composed digit canvases of engine.builtin.digits_text.

    python -m engine train --model digits-text --out DIR --seed 0

The objective is the MAR one of engine.builtin.training (random orders, truncated-Gaussian masking ratio,
the hybrid diffusion loss on the masked tokens, AdamW, warmup + cosine, EMA), with Fluid's
conditioning: the caption's frozen T5 embedding goes through the trained text aligner, and with
probability `label_drop_prob` it is replaced by the null text (`fake_latent`, after the aligner,
as the sampler's CFG branch reads it). Position embeddings are interpolated from the stored
16 x 16 tables to the 4 x 8 token grid with the sampler's function (read back h-major, the
tokens' order: `interpolate_w_major=False`), so training and sampling see the same positions. Batches are drawn from a `random.Random` seeded with (seed, step), so a
resumed run draws the same images and captions as an uninterrupted one.

Initialisation: engine.builtin.training's (the published MAR one), except that the three position tables
start as a 2-D sine-cosine table of the stored 16 x 16 grid (MAE's, unit amplitude) instead of
N(0, 0.02). Why (docs/digits-text/experiments.md): with tiny random tables, bicubically
downsampled to the 4 x 8 grid, the left and right slots start nearly alike, and binding a word
to a slot ("on the left", "to the left of") is a symmetric saddle the model never left: the
4000-step model's loss did not change when "left" was replaced by "right" (0.0759 / 0.0761).
From the sine-cosine start the same recipe binds sides within 800 steps.

Data: "a A and a B" is drawn with A on the left. Either order is a correct picture of that
caption (GenEval accepts both), but trained on both orders the model picks each slot's digit on
its own and draws one of the two digits twice in about 40% of samples (the two slots have to
agree through the known tokens); drawn in mention order, the caption binds its digits to slots
as a position caption does.
"""
from __future__ import annotations

import math
import random

import torch

from . import digits_text as dt
from ..families.fluid import FluidConfig
from ..models.fluid import BASE_GRID, Fluid, interpolate_positions
from ..models.mar import gather_rows, patchify

DIGITS_TEXT_MODEL = dict(
    img_size=dt.HEIGHT, img_width=dt.WIDTH, vae_stride=1, patch_size=4, vae_embed_dim=1,
    tokenizer="pixels", text_depth=1, caption_channels=dt.T5_SIZES["d_model"], max_length=dt.MAX_LENGTH,
    encoder_embed_dim=128, encoder_depth=2, encoder_num_heads=4,
    decoder_embed_dim=128, decoder_depth=3, decoder_num_heads=4,
    cross_embed_dim=128, cross_depth=2, cross_num_heads=4, mlp_ratio=4.0,
    diffloss_d=3, diffloss_w=128, num_sampling_steps="50", clip_denoised=True, clip_range=(-1.0, 1.0),
    # On the 4 x 8 grid LightGen's w-major read-back gives the two slots' columns neighbouring
    # position rows (left and right barely differ: trained that way the model scored 0.4).
    interpolate_w_major=False,
)
DIGITS_TEXT_SAMPLING = dict(cfg=3.0, num_iter=16, temperature=1.0)
# Training settings that differ from engine.builtin.training.TrainConfig's (the digits MAR's): batches of
# 64 with two diffusion draws per token keep a step at ~0.4 CPU-seconds with 32 tokens per image;
# one thread makes the run reproducible bit for bit on a shared 2-core machine (~27 min).
DIGITS_TEXT_TRAINING = dict(steps=4000, batch_size=64, diffusion_batch_mul=2, threads=1)


def digits_text_config(**overrides) -> FluidConfig:
    return FluidConfig.from_dict({**DIGITS_TEXT_MODEL, **overrides})


POSITION_TABLES = ("encoder_pos_embed_learned", "decoder_pos_embed_learned", "last_pos_embed_learned")


def sincos_positions(dim: int, grid: int = BASE_GRID) -> torch.Tensor:
    """[1, grid * grid, dim] 2-D sine-cosine position table (MAE's get_2d_sincos_pos_embed:
    the first half of the channels encodes the row, the second the column), float32."""
    if dim % 4:
        raise ValueError(f"a 2-D sine-cosine table needs a width divisible by 4, got {dim}")

    def axis(d, pos):
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2))
        angles = pos[:, None] * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64),
                                torch.arange(grid, dtype=torch.float64), indexing="ij")
    table = torch.cat([axis(dim // 2, rows.reshape(-1)), axis(dim // 2, cols.reshape(-1))], dim=1)
    return table.float()[None]


class TextCanvasTask:
    """The digits-text training data and loss for engine.builtin.training's loop."""

    name = "digits-text"

    def __init__(self, config: FluidConfig, seed: int, text_encoder=None):
        from ..decoders.text import TextEncoder

        self.config, self.seed = config, seed
        self.canvases = dt.CanvasSampler("train", mention_order=True)
        if text_encoder is None:
            from ..decoders.text import random_t5_encoder, word_tokenizer

            tokenizer = word_tokenizer(dt.VOCABULARY)
            text_encoder = TextEncoder(random_t5_encoder(len(tokenizer), dt.T5_SEED, **dt.T5_SIZES),
                                       tokenizer, dt.MAX_LENGTH)
        prompts = dt.all_prompts()   # the T5 is frozen: embed every caption of the grammar once
        self.texts = dict(zip(prompts, text_encoder(prompts)))

    def build(self) -> Fluid:
        return Fluid(self.config)

    def init_weights(self, module: Fluid) -> Fluid:
        """engine.builtin.training's initialisation, then sine-cosine position tables (module docstring)."""
        from .training import init_weights

        init_weights(module)
        with torch.no_grad():
            for name in POSITION_TABLES:
                table = getattr(module, name)
                table.copy_(sincos_positions(table.shape[-1], BASE_GRID))
        return module

    def start(self, generator) -> None:
        pass

    def state(self) -> dict:
        return {}

    def load_state(self, state: dict) -> None:
        pass

    def loss(self, model: Fluid, tables, step: int, batch_size: int, generator, tc):
        rng = random.Random(self.seed * 1_000_003 + step)
        images, captions, _ = self.canvases.batch(batch_size, rng)
        texts = torch.stack([self.texts[c] for c in captions])
        return fluid_loss(model, tables, images, texts, generator, tc.label_drop_prob,
                          tc.diffusion_batch_mul, tc.mask_ratio_min)


def fluid_loss(model: Fluid, tables, images, texts, generator=None, text_drop_prob: float = 0.1,
               diffusion_batch_mul: int = 4, mask_ratio_min: float = 0.7):
    """The MAR training loss of a Fluid on `images [B, C, H, W]` (token range) captioned by
    `texts [B, max_length, caption_channels]` (text-encoder outputs). Returns (loss, stats)."""
    from .training import diffusion_loss, sample_mask_ratio

    c = model.config
    grid = (images.shape[-2] // c.patch_size, images.shape[-1] // c.patch_size)
    tokens = patchify(images, c.patch_size)
    bsz, length, dim = tokens.shape
    num_masked = min(max(int(math.ceil(length * sample_mask_ratio(generator, mask_ratio_min))), 1), length)
    orders = torch.argsort(torch.rand(bsz, length, generator=generator), dim=1)
    masked = torch.sort(orders[:, :num_masked], dim=1).values
    known = torch.sort(orders[:, num_masked:], dim=1).values

    enc_pos, dec_pos, last_pos = (interpolate_positions(p, grid, c.interpolate_offset, c.interpolate_w_major) for p in
                                  (model.encoder_pos_embed_learned, model.decoder_pos_embed_learned,
                                   model.last_pos_embed_learned))
    text = model.text_emb(texts)
    drop = torch.rand(bsz, generator=generator) < text_drop_prob
    text = torch.where(drop[:, None, None], model.fake_latent.expand_as(text), text)
    kv = [t for block in model.cross_attn_blocks for t in block.keys_values(text)]
    encoded = model.encode(tokens, known, enc_pos, model.encoder_text_rows(text))
    x = model.decode(encoded, known, masked, dec_pos, model.decoder_text_rows(text))
    z = model.text_decode(x, masked, last_pos, kv)                       # [B, m, D]
    target = gather_rows(tokens, masked)
    loss, mse, vb = diffusion_loss(model.diffloss.net, tables, target.reshape(-1, dim),
                                   z.reshape(-1, z.shape[-1]), generator, repeat=diffusion_batch_mul)
    return loss.mean(), {"mse": float(mse.detach().mean()), "vb": float(vb.detach().mean()),
                         "mask_ratio": num_masked / length}
