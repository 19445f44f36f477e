"""Shared test helpers: golden data, an independent eager re-statement of the published sampler
(written from ../shared/spec/mar-sampling.md with masks and nonzero, as the published code does),
random models of any configuration, and a stand-in for an instance of the published MAR class."""
from __future__ import annotations

import json
import math
import types
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import GOLDEN_DIR, rel_err  # noqa: F401  (rel_err: re-exported for the tests)
from engine.core.config import MARConfig
from engine.ops.diffusion import space_timesteps
from engine.models.mar import MAR

CHECKPOINT = GOLDEN_DIR / "checkpoint-last.pth"


@lru_cache(maxsize=1)
def golden_json() -> dict:
    return json.loads((GOLDEN_DIR / "golden.json").read_text())


@lru_cache(maxsize=1)
def golden_tensors() -> dict:
    return load_file(str(GOLDEN_DIR / "golden.safetensors"))


def golden_cases(kind: str) -> list[dict]:
    return [c for c in golden_json()["cases"] if c["kind"] == kind]


def random_mar(seed: int = 0, **overrides) -> MAR:
    """A MAR with random weights of any configuration (no zero-initialised layers)."""
    values = dict(img_size=64, vae_stride=16, patch_size=1, vae_embed_dim=16,
                  encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=2,
                  decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=4,
                  class_num=10, buffer_size=4, diffloss_d=2, diffloss_w=48,
                  num_sampling_steps="10")
    values.update(overrides)
    return randomise(MAR(MARConfig(**values)), seed)


def random_fluid(seed: int = 0, **overrides):
    """A Fluid (LightGen FLUID layout) with random weights of any configuration."""
    from engine.families.fluid import FluidConfig
    from engine.models.fluid import Fluid

    values = dict(img_size=256, vae_stride=16, patch_size=1, vae_embed_dim=4, text_depth=1,
                  encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=2,
                  decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=4,
                  cross_embed_dim=32, cross_depth=2, cross_num_heads=2, caption_channels=12,
                  max_length=5, diffloss_d=2, diffloss_w=48, num_sampling_steps="10")
    values.update(overrides)
    return randomise(Fluid(FluidConfig(**values)), seed)


def randomise(module, seed: int):
    """Random weights everywhere (no zero-initialised layers); LayerNorm gains near 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(("norm1.weight", "norm2.weight", "ln.weight", "norm.weight", "in_ln.weight",
                              "normq.weight", "normkv.weight", "aligner_norm.weight")):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(max(p.shape[-1], 1)))
    return module.eval()


# ------------------------------------------------------------------------------------------
# The published sampler, re-stated from the spec: full-size masks, nonzero gathers, per-step
# numpy-table lookups. It uses the model's layers but none of the engine's sampling code.

def _tables(respacing: str):
    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    base = np.array([min(1 - alpha_bar((i + 1) / 1000) / alpha_bar(i / 1000), 0.999) for i in range(1000)])
    ab_full = np.cumprod(1 - base)
    kept = sorted(space_timesteps(1000, respacing))
    betas, last = [], 1.0
    for t in kept:
        betas.append(1 - ab_full[t] / last)
        last = ab_full[t]
    betas = np.array(betas)
    ab = np.cumprod(1 - betas)
    ab_prev = np.append(1.0, ab[:-1])
    pv = betas * (1 - ab_prev) / (1 - ab)
    return dict(map=np.array(kept), sr=np.sqrt(1 / ab), srm1=np.sqrt(1 / ab - 1),
                c1=betas * np.sqrt(ab_prev) / (1 - ab), c2=(1 - ab_prev) * np.sqrt(1 - betas) / (1 - ab),
                minlog=np.log(np.append(pv[1], pv[1:])), maxlog=np.log(betas))


def spec_transformer(mar: MAR, tokens, mask, class_emb):
    """Published encoder/decoder pass with a full mask: z [B, L, D]."""
    c = mar.config
    buf = c.buffer_size
    x = mar.z_proj(tokens)
    b, _, e = x.shape
    x = torch.cat([torch.zeros(b, buf, e), x], dim=1)
    mwb = torch.cat([torch.zeros(b, buf), mask], dim=1)
    x[:, :buf] = class_emb.unsqueeze(1)
    x = mar.z_proj_ln(x + mar.encoder_pos_embed_learned)
    x = x[(1 - mwb).nonzero(as_tuple=True)].reshape(b, -1, e)
    for blk in mar.encoder_blocks:
        x = _spec_block(blk, x)
    x = mar.decoder_embed(mar.encoder_norm(x))
    full = mar.mask_token.repeat(b, mwb.shape[1], 1).clone()
    full[(1 - mwb).nonzero(as_tuple=True)] = x.reshape(-1, x.shape[-1])
    x = full + mar.decoder_pos_embed_learned
    for blk in mar.decoder_blocks:
        x = _spec_block(blk, x)
    x = mar.decoder_norm(x)[:, buf:]
    return x + mar.diffusion_pos_embed_learned


def _spec_block(blk, x):
    b, n, d = x.shape
    heads = blk.attn.num_heads
    h = F.layer_norm(x, (d,), blk.norm1.weight, blk.norm1.bias, 1e-6)
    q, k, v = F.linear(h, blk.attn.qkv.weight, blk.attn.qkv.bias).reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    att = torch.softmax(q @ k.transpose(-2, -1) * (d // heads) ** -0.5, dim=-1)
    x = x + blk.attn.proj((att @ v).transpose(1, 2).reshape(b, n, d))
    h = F.layer_norm(x, (d,), blk.norm2.weight, blk.norm2.bias, 1e-6)
    return x + blk.mlp.fc2(F.gelu(blk.mlp.fc1(h)))


def spec_head_sample(net, z, temperature, cfg, tables, clip=None):
    """Published DiffLoss.sample: draws from torch's global RNG."""
    cdim = net.in_channels
    if cfg != 1.0:
        noise = torch.randn(z.shape[0] // 2, cdim)
        x = torch.cat([noise, noise])
    else:
        x = torch.randn(z.shape[0], cdim)
    for i in reversed(range(len(tables["map"]))):
        t = torch.full((z.shape[0],), i)
        ts = torch.from_numpy(tables["map"])[t]
        out = net.forward_with_cfg(x, ts, z, cfg) if cfg != 1.0 else net(x, ts, z)
        eps, v = out[:, :cdim], out[:, cdim:]

        def ex(name):
            return torch.from_numpy(tables[name])[t].float()[:, None]
        x0 = ex("sr") * x - ex("srm1") * eps
        if clip is not None:
            x0 = x0.clamp(*clip)
        mean = ex("c1") * x0 + ex("c2") * x
        frac = (v + 1) / 2
        logvar = frac * ex("maxlog") + (1 - frac) * ex("minlog")
        x = mean + (t != 0).float()[:, None] * torch.exp(0.5 * logvar) * torch.randn_like(x) * temperature
    return x


@torch.no_grad()
def spec_sample_tokens(mar: MAR, bsz, num_iter=64, cfg=1.0, cfg_schedule="linear", labels=None,
                       temperature=1.0):
    """Published sample_tokens (global numpy + torch RNG), skipping steps that predict nothing."""
    c = mar.config
    seq_len, cdim = c.seq_len, c.token_dim
    tables = _tables(c.num_sampling_steps)
    clip = c.clip_range if c.clip_denoised else None
    mask = torch.ones(bsz, seq_len)
    tokens = torch.zeros(bsz, seq_len, cdim)
    orders = []
    for _ in range(bsz):
        order = np.array(list(range(seq_len)))
        np.random.shuffle(order)
        orders.append(order)
    orders = torch.tensor(np.array(orders)).long()
    for step in range(num_iter):
        cur = tokens.clone()
        ce = mar.class_emb(torch.as_tensor(labels)) if labels is not None else mar.fake_latent.repeat(bsz, 1)
        m = mask
        if cfg != 1.0:
            tokens = torch.cat([tokens, tokens])
            ce = torch.cat([ce, mar.fake_latent.repeat(bsz, 1)])
            m = torch.cat([mask, mask])
        z = spec_transformer(mar, tokens, m, ce)
        ratio = np.cos(math.pi / 2.0 * (step + 1) / num_iter)
        mask_len = torch.Tensor([np.floor(seq_len * ratio)])
        mask_len = torch.maximum(torch.Tensor([1]), torch.minimum(mask.sum(-1, keepdim=True) - 1, mask_len))
        nxt = torch.zeros(bsz, seq_len).scatter(-1, orders[:, :int(mask_len[0])], torch.ones(bsz, seq_len)).bool()
        to_pred = mask.bool() if step >= num_iter - 1 else torch.logical_xor(mask.bool(), nxt)
        mask = nxt.float()
        if not to_pred.any():
            tokens = cur
            continue
        tp = torch.cat([to_pred, to_pred]) if cfg != 1.0 else to_pred
        zr = z[tp.nonzero(as_tuple=True)]
        scale = 1 + (cfg - 1) * (seq_len - mask_len[0]) / seq_len if cfg_schedule == "linear" else cfg
        out = spec_head_sample(mar.diffloss.net, zr, temperature, scale, tables, clip)
        if cfg != 1.0:
            out = out[: out.shape[0] // 2]
        cur[to_pred.nonzero(as_tuple=True)] = out
        tokens = cur.clone()
    p, h = c.patch_size, c.seq_h
    return tokens.reshape(bsz, h, h, c.vae_embed_dim, p, p).permute(0, 3, 1, 4, 2, 5).reshape(
        bsz, c.vae_embed_dim, h * p, h * p)


def published_standin(mar: MAR) -> torch.nn.Module:
    """An object with the attributes and state dict of an instance of the published MAR class
    (the parts `engine.accelerate` duck-types), built around `mar`'s modules."""
    c = mar.config
    obj = torch.nn.Module()
    for name, child in mar.named_children():
        obj.add_module(name, child)
    for name, p in mar.named_parameters(recurse=False):
        obj.register_parameter(name, p)
    obj.img_size, obj.vae_stride, obj.patch_size = c.img_size, c.vae_stride, c.patch_size
    obj.vae_embed_dim, obj.buffer_size, obj.seq_len = c.vae_embed_dim, c.buffer_size, c.seq_len
    obj.num_classes = c.class_num
    obj.diffloss.gen_diffusion = types.SimpleNamespace(
        use_timesteps=set(space_timesteps(1000, c.num_sampling_steps)))
    obj.sample_tokens = lambda *a, **k: "published sample_tokens"
    return obj


def run_golden_head_case(model, case) -> tuple[torch.Tensor, torch.Tensor]:
    """(model's head loop output, the published tokens) for a golden "diffloss_sample" case,
    with its start noise drawn as the published code does."""
    from engine.core.loop import draw_step_noise

    g, p = golden_tensors(), case["params"]
    z, want = g[f"{case['name']}.z"], g[f"{case['name']}.tokens"]
    cfg = p["cfg"]
    n = z.shape[0] // 2 if cfg != 1.0 else z.shape[0]
    torch.manual_seed(p["torch_seed"])
    x = torch.randn(n, model.config.token_dim)
    noise = draw_step_noise(model.head.num_steps, z.shape[0], model.config.token_dim, None, "cpu")
    out = model.backend.head_loop(model.head, z, x, noise, cfg if cfg != 1.0 else None, p["temperature"])
    return out, want[:n]


def save(tmp_path, obj, name="ckpt.pth"):
    """torch.save `obj` into tmp_path; the path."""
    path = tmp_path / name
    torch.save(obj, path)
    return path
