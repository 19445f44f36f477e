"""Does a trained digit model read its known tokens? The diffusion loss (MSE of the predicted
noise) of the masked tokens, half of each image's tokens known, with the image's own known tokens
and with another image's at the same positions (same noise, same timesteps). A model that uses
the image context does worse with the wrong context (ratio > 1); one that predicts every token
from the condition and its position alone does not notice (ratio 1).

    python docs/digits-text/context_probe.py [CHECKPOINT ...]   # default: digits-text digits

Fluid models (digits-text) are probed per caption category, MAR models (digits) on real digits.
"""
from __future__ import annotations

import json
import random
import sys

import torch

import engine
from engine.builtin import digits_text as dt
from engine.builtin.digits import load_split
from engine.models.fluid import interpolate_positions
from engine.models.mar import gather_rows, patchify
from engine.builtin.training import TrainTables, diffusion_loss

SAMPLES, KNOWN_FRACTION = 256, 0.5


@torch.no_grad()
def masked_mse(model, images, context_images, condition) -> float:
    """Mean eps-MSE over the masked half of `images`' tokens, the known half taken from
    `context_images`; `condition`: class labels (MAR) or T5 caption embeddings (Fluid)."""
    net, c = model.mar, model.mar.config
    g = torch.Generator().manual_seed(0)
    tokens, context = patchify(images, c.patch_size), patchify(context_images, c.patch_size)
    b, length, dim = tokens.shape
    order = torch.argsort(torch.rand(b, length, generator=g), dim=1)
    masked = order[:, : int(length * (1 - KNOWN_FRACTION))].sort(1).values
    known = order[:, int(length * (1 - KNOWN_FRACTION)):].sort(1).values
    if model.family == "fluid":
        grid = (images.shape[-2] // c.patch_size, images.shape[-1] // c.patch_size)
        enc_pos, dec_pos, last_pos = (interpolate_positions(p, grid, c.interpolate_offset, c.interpolate_w_major)
                                      for p in (net.encoder_pos_embed_learned, net.decoder_pos_embed_learned,
                                                net.last_pos_embed_learned))
        text = net.text_emb(condition)
        kv = [t for block in net.cross_attn_blocks for t in block.keys_values(text)]
        x = net.decode(net.encode(context, known, enc_pos, net.encoder_text_rows(text)), known, masked, dec_pos,
                       net.decoder_text_rows(text))
        z = net.text_decode(x, masked, last_pos, kv)
    else:
        z = net.decode(net.encode(context, known, net.class_emb(condition)), known, masked)
    _, mse, _ = diffusion_loss(net.diffloss.net, TrainTables(), gather_rows(tokens, masked).reshape(-1, dim),
                               z.reshape(-1, z.shape[-1]), g, repeat=4)
    return float(mse.mean())


def probe(checkpoint: str) -> dict:
    model = engine.load(checkpoint, backend="reference")
    cases = {}
    if model.family == "fluid":
        sampler = dt.CanvasSampler("train")
        for category in dt.CATEGORIES:
            images, captions, _ = sampler.batch(SAMPLES, random.Random(1), category)
            other, _, _ = sampler.batch(SAMPLES, random.Random(2), category)
            cases[category] = (images, other, model.text_encoder(captions))
    else:
        images, labels = load_split("train", model.config.img_size)
        cases["digits"] = (images[:SAMPLES], images[:SAMPLES].roll(1, 0), labels[:SAMPLES])
    out = {}
    for name, (images, other, condition) in cases.items():
        own, wrong = masked_mse(model, images, images, condition), masked_mse(model, images, other, condition)
        out[name] = {"own_context": round(own, 4), "other_context": round(wrong, 4), "ratio": round(wrong / own, 3)}
    return out


def main() -> int:
    torch.set_num_threads(1)
    report = {ckpt: probe(ckpt) for ckpt in (sys.argv[1:] or ["digits-text", "digits"])}
    for ckpt, rows in report.items():
        for name, r in rows.items():
            print(f"{ckpt:20s} {name:14s} own {r['own_context']:.4f}  other {r['other_context']:.4f}  "
                  f"ratio {r['ratio']:.3f}")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
