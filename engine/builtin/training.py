"""The training loop of the built-in models (engine.builtin): the digits MAR's configuration,
initialisation, the MAR objective's losses, AdamW with warmup + cosine and an EMA of the weights,
resumable; `train(model_config, tc, task=...)` runs any task object (DigitsTask here, and the
tasks of train_causal, train_text, train_discrete, train_mlm and train_ctf). The objective and the
command line are described in engine.builtin.train (`python -m engine train`)."""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..arguments import set_threads
from ..core.config import MARConfig
from ..ops.diffusion import NUM_TRAIN_TIMESTEPS, cosine_betas
from ..core.errors import ConfigError
from ..models.mar import MAR, patchify

# The built-in digits model. Tokens are 4x4 patches of 16x16 pixel images (16 tokens of 16
# values in [-1, 1]); x0 is clipped to that range while sampling (see config.clip_denoised).
DIGITS_MODEL = dict(
    img_size=16, vae_stride=1, patch_size=4, vae_embed_dim=1, tokenizer="pixels",
    encoder_embed_dim=128, encoder_depth=3, encoder_num_heads=4,
    decoder_embed_dim=128, decoder_depth=3, decoder_num_heads=4,
    mlp_ratio=4.0, class_num=10, buffer_size=4, diffloss_d=3, diffloss_w=128,
    num_sampling_steps="50", clip_denoised=True, clip_range=(-1.0, 1.0),
)
# Sampling settings recorded with the shipped model (the CLI's defaults for it).
DIGITS_SAMPLING = dict(cfg=2.0, num_iter=8, temperature=1.0)


def digits_config(**overrides) -> MARConfig:
    return MARConfig.from_dict({**DIGITS_MODEL, **overrides})


@dataclass
class TrainConfig:
    steps: int = 3000
    batch_size: int = 128
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_steps: int = 100
    weight_decay: float = 0.02
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 3.0
    ema_decay: float = 0.999
    label_drop_prob: float = 0.1
    diffusion_batch_mul: int = 4
    mask_ratio_min: float = 0.7
    seed: int = 0
    threads: int = 2  # both cores of the 2-core target machine: 1.4x one thread
    log_every: int = 100

    def validate(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.diffusion_batch_mul < 1:
            raise ConfigError("steps, batch_size and diffusion_batch_mul must be positive")
        if not 0.0 < self.mask_ratio_min <= 1.0:
            raise ConfigError(f"mask_ratio_min must be in (0, 1], got {self.mask_ratio_min}")
        if not 0.0 <= self.label_drop_prob < 1.0:
            raise ConfigError(f"label_drop_prob must be in [0, 1), got {self.label_drop_prob}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay must be in [0, 1), got {self.ema_decay}")


# Initialisation (as the published model: xavier-uniform linears, N(0, 0.02) embeddings, and a
# head whose adaLN projections and output layer start at zero) ---------------------------------
# Embedding-like parameters drawn from N(0, 0.02), in this order (the RNG order of the shipped runs).
EMBEDDINGS = ("class_emb.weight", "fake_latent", "mask_token", "encoder_pos_embed_learned",
              "decoder_pos_embed_learned", "diffusion_pos_embed_learned", "last_pos_embed_learned")


@torch.no_grad()
def init_weights(model: nn.Module) -> nn.Module:
    """MAR or Fluid (any module with `diffloss.net`), in place."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    params = dict(model.named_parameters())
    for name in EMBEDDINGS:
        if name in params:
            nn.init.normal_(params[name], std=0.02)
    net = model.diffloss.net
    nn.init.normal_(net.time_embed.mlp[0].weight, std=0.02)
    nn.init.normal_(net.time_embed.mlp[2].weight, std=0.02)
    for block in net.res_blocks:
        nn.init.zeros_(block.adaLN_modulation[-1].weight)
        nn.init.zeros_(block.adaLN_modulation[-1].bias)
    final = net.final_layer
    for p in (final.adaLN_modulation[-1].weight, final.adaLN_modulation[-1].bias,
              final.linear.weight, final.linear.bias):
        nn.init.zeros_(p)
    return model


# The 1000-step training diffusion --------------------------------------------------------------
class TrainTables:
    """Per original timestep t (0..999), float32 tensors computed in float64."""

    def __init__(self, num_steps: int = NUM_TRAIN_TIMESTEPS):
        betas = cosine_betas(num_steps)
        ab = np.cumprod(1.0 - betas)
        ab_prev = np.append(1.0, ab[:-1])
        post_var = betas * (1.0 - ab_prev) / (1.0 - ab)
        cols = dict(
            sqrt_ab=np.sqrt(ab), sqrt_1m_ab=np.sqrt(1.0 - ab),
            sqrt_recip_ab=np.sqrt(1.0 / ab), sqrt_recipm1_ab=np.sqrt(1.0 / ab - 1.0),
            coef1=betas * np.sqrt(ab_prev) / (1.0 - ab),
            coef2=(1.0 - ab_prev) * np.sqrt(1.0 - betas) / (1.0 - ab),
            min_log=np.log(np.append(post_var[1], post_var[1:])), max_log=np.log(betas),
        )
        self.num_steps = num_steps
        for name, col in cols.items():
            setattr(self, name, torch.from_numpy(col).float())

    def at(self, name: str, t: torch.Tensor) -> torch.Tensor:
        return getattr(self, name)[t].unsqueeze(-1)


def _normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _std_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _discretized_gaussian_nll(x, mean, log_scale, half_bin=1.0 / 255.0):
    """-log P(x) of a Gaussian integrated over x's bin (edge bins open), in nats."""
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = _std_normal_cdf(inv_std * (centered + half_bin))
    cdf_min = _std_normal_cdf(inv_std * (centered - half_bin))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    logp = torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))
    return -logp


def head_forward(net, x, t, c_emb, time_table=None):
    """The head's forward with its conditions given as already embedded `c_emb` = cond_embed(c)
    and the time embedding looked up from `time_table` (time_embed of all 1000 steps, computed
    once per batch). Same function as `DiffusionHead.forward`; cheaper when rows share t or c."""
    # F.embedding's CPU backward is deterministic (indexing's accumulate is not).
    t_emb = net.time_embed(t) if time_table is None else F.embedding(t, time_table)
    y = t_emb + c_emb
    h = net.input_proj(x)
    for block in net.res_blocks:
        h = block(h, y)
    return net.final_layer(h, y)


def diffusion_loss(net, tables: TrainTables, target, z, generator=None, repeat: int = 1):
    """Per-row hybrid loss (mse on eps + VLB in bits for the variance) of `target [N, C]` under
    conditions `z [N, D]`, each row repeated `repeat` times (rows [N*repeat], repeat-major as the
    published `Tensor.repeat`). Returns (loss, mse, vb), each [N*repeat]."""
    c_emb = net.cond_embed(z).repeat(repeat, 1)
    x0 = target.repeat(repeat, 1)
    n = x0.shape[0]
    t = torch.randint(0, tables.num_steps, (n,), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    x_t = tables.at("sqrt_ab", t) * x0 + tables.at("sqrt_1m_ab", t) * noise
    time_table = net.time_embed(torch.arange(tables.num_steps))
    out = head_forward(net, x_t, t, c_emb, time_table)
    eps, v = out.split(x0.shape[1], dim=1)
    mse = ((noise - eps) ** 2).mean(dim=1)

    # Variance: the bound term with the eps prediction frozen, so it trains v only.
    min_log, max_log = tables.at("min_log", t), tables.at("max_log", t)
    frac = (v + 1) / 2
    model_logvar = frac * max_log + (1 - frac) * min_log
    pred_x0 = tables.at("sqrt_recip_ab", t) * x_t - tables.at("sqrt_recipm1_ab", t) * eps.detach()
    model_mean = tables.at("coef1", t) * pred_x0 + tables.at("coef2", t) * x_t
    true_mean = tables.at("coef1", t) * x0 + tables.at("coef2", t) * x_t
    kl = _normal_kl(true_mean, min_log, model_mean, model_logvar).mean(dim=1)
    nll = _discretized_gaussian_nll(x0, model_mean, 0.5 * model_logvar).mean(dim=1)
    vb = torch.where(t == 0, nll, kl) / math.log(2.0)
    return mse + vb, mse, vb


def sample_mask_ratio(generator, mask_ratio_min: float = 0.7, std: float = 0.25) -> float:
    """A draw of the left half of N(1, std^2) truncated to [mask_ratio_min, 1] (rejection)."""
    while True:
        r = 1.0 - abs(float(torch.randn((), generator=generator))) * std
        if r >= mask_ratio_min:
            return r


def mar_loss(mar: MAR, tables: TrainTables, images, labels, generator=None,
             label_drop_prob: float = 0.1, diffusion_batch_mul: int = 4, mask_ratio_min: float = 0.7):
    """The MAR training loss of a batch `images [B, C, H, W]` in the token range, `labels [B]`.
    Returns (loss, stats dict of floats)."""
    config = mar.config
    tokens = patchify(images, config.patch_size)           # [B, L, C]
    bsz, length, dim = tokens.shape
    num_masked = int(math.ceil(length * sample_mask_ratio(generator, mask_ratio_min)))
    num_masked = min(max(num_masked, 1), length)
    orders = torch.argsort(torch.rand(bsz, length, generator=generator), dim=1)
    masked = torch.sort(orders[:, :num_masked], dim=1).values
    known = torch.sort(orders[:, num_masked:], dim=1).values

    class_emb = mar.class_emb(labels)
    drop = torch.rand(bsz, generator=generator) < label_drop_prob
    class_emb = torch.where(drop.unsqueeze(-1), mar.fake_latent.expand(bsz, -1), class_emb)

    # Conditions of the masked positions only (the decoder's last block computes just those rows).
    z = mar.decode(mar.encode(tokens, known, class_emb), known, masked)   # [B, m, D]
    target = torch.gather(tokens, 1, masked.unsqueeze(-1).expand(-1, -1, dim))
    loss, mse, vb = diffusion_loss(mar.diffloss.net, tables, target.reshape(-1, dim),
                                   z.reshape(-1, z.shape[-1]), generator, repeat=diffusion_batch_mul)
    return loss.mean(), {"mse": float(mse.detach().mean()), "vb": float(vb.detach().mean()),
                         "mask_ratio": num_masked / length}


def param_groups(mar: MAR, weight_decay: float):
    decay, no_decay = [], []
    for name, p in mar.named_parameters():
        if p.ndim == 1 or name.endswith(".bias") or name.startswith("diffloss."):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def lr_at(step: int, tc: TrainConfig) -> float:
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    progress = (step - tc.warmup_steps) / max(1, tc.steps - tc.warmup_steps)
    return tc.min_lr + (tc.lr - tc.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


class DigitsTask:
    """The class-conditional digits: a MAR on the images of one split, epochs of a random
    permutation drawn from the training generator."""

    name = "digits"

    def __init__(self, config: MARConfig, images=None, labels=None):
        if config.tokenizer != "pixels" or config.vae_stride != 1:
            raise ConfigError("training is implemented for pixel-token models (tokenizer='pixels', "
                              "vae_stride=1)")
        if images is None:
            from .digits import load_split
            images, labels = load_split("train", size=config.img_size)
        if images.shape[1] != config.vae_embed_dim or images.shape[-1] != config.img_size:
            raise ConfigError(f"images of shape {list(images.shape[1:])} do not fit the config "
                              f"({config.vae_embed_dim} x {config.img_size} x {config.img_size})")
        self.config, self.images, self.labels = config, images, labels
        self.perm, self.cursor = None, 0

    def build(self) -> MAR:
        return MAR(self.config)

    def start(self, generator) -> None:
        self.perm, self.cursor = torch.randperm(len(self.images), generator=generator), 0

    def state(self) -> dict:
        return {"perm": self.perm, "cursor": self.cursor}

    def load_state(self, state: dict) -> None:
        self.perm, self.cursor = state["perm"], state["cursor"]

    def loss(self, model, tables, step: int, batch_size: int, generator, tc: "TrainConfig"):
        if self.cursor + batch_size > len(self.images):
            self.perm, self.cursor = torch.randperm(len(self.images), generator=generator), 0
        idx = self.perm[self.cursor:self.cursor + batch_size]
        self.cursor += batch_size
        return mar_loss(model, tables, self.images[idx], self.labels[idx], generator, tc.label_drop_prob,
                        tc.diffusion_batch_mul, tc.mask_ratio_min)


def train(model_config, tc: TrainConfig, images=None, labels=None, log=print,
          on_snapshot=None, snapshot_every: int = 0, resume_path=None, resume_every: int = 0,
          task=None):
    """Train a model from scratch on `task` (default: a MAR on the digits; `images [N, C, H, W]`
    in the token range and `labels [N]` default to the digits train split). The task builds
    the module and gives each step's loss (DigitsTask; engine.builtin.train_text.TextCanvasTask for
    the text-to-image model). Returns a dict with the EMA state dict ("ema"), the raw weights
    ("model") and the loss history. With `snapshot_every`, `on_snapshot(step, ema_state)` is
    called every that many steps. With `resume_path`, the whole training state is saved there
    every `resume_every` steps and, if the file exists at the start, training continues from
    it exactly (same result as an uninterrupted run)."""
    tc.validate()
    task = task if task is not None else DigitsTask(model_config, images, labels)
    set_threads(tc.threads, "threads", minimum=0)   # 0: keep torch's setting (the tests' one thread)
    torch.manual_seed(tc.seed)
    generator = torch.Generator().manual_seed(tc.seed)
    module = task.build()   # a task may bring its own initialisation (the discrete models do)
    mar = (task.init_weights(module) if hasattr(task, "init_weights") else init_weights(module)).train()
    stat_names = getattr(task, "stat_names", ("mse", "vb"))   # the per-step statistics logged
    tables = TrainTables()
    opt = torch.optim.AdamW(param_groups(mar, tc.weight_decay), lr=tc.lr, betas=(tc.beta1, tc.beta2))
    names = [name for name, _ in mar.named_parameters()]
    params = [p for p in mar.parameters()]
    ema = [p.detach().clone() for p in params]

    task.start(generator)
    history, window, start, cpu_start = [], [], time.time(), time.process_time()
    first = 0
    if resume_path is not None and Path(resume_path).exists():
        saved = torch.load(resume_path, map_location="cpu", weights_only=True)
        if saved["train_config"] != json.dumps(dataclasses.asdict(tc), sort_keys=True) or \
                saved["model_config"] != json.dumps(model_config.to_dict(), sort_keys=True):
            raise ConfigError(f"{resume_path} was written by a run with other settings; remove it "
                              "to start afresh")
        mar.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        for e, v in zip(ema, saved["ema"]):
            e.copy_(v)
        generator.set_state(saved["generator"])
        task.load_state(saved["task"])
        first = saved["step"]
        history, window = saved["history"], [tuple(w) for w in saved["window"]]
        start -= saved["elapsed"]
        cpu_start -= saved["cpu"]
        if log:
            log(f"resumed from {resume_path} at step {first}", flush=True)

    def save_resume(step_done):
        tmp = Path(str(resume_path) + ".tmp")
        torch.save({"step": step_done, "model": mar.state_dict(), "opt": opt.state_dict(), "ema": ema,
                    "generator": generator.get_state(), "task": task.state(),
                    "history": history, "window": [list(w) for w in window],
                    "elapsed": time.time() - start, "cpu": time.process_time() - cpu_start,
                    "train_config": json.dumps(dataclasses.asdict(tc), sort_keys=True),
                    "model_config": json.dumps(model_config.to_dict(), sort_keys=True)}, tmp)
        tmp.replace(resume_path)

    for step in range(first, tc.steps):
        lr = lr_at(step, tc)
        for group in opt.param_groups:
            group["lr"] = lr
        loss, stats = task.loss(mar, tables, step, tc.batch_size, generator, tc)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {float(loss)} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        opt.step()
        decay = min(tc.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - decay)
        window.append((loss.item(), *(stats[k] for k in stat_names)))
        if (step + 1) % tc.log_every == 0 or step + 1 == tc.steps:
            mean = np.mean(window, axis=0)
            elapsed = time.time() - start
            cpu = time.process_time() - cpu_start
            history.append({"step": step + 1, "loss": float(mean[0]),
                            **{k: float(m) for k, m in zip(stat_names, mean[1:])}, "lr": lr,
                            "elapsed_s": round(elapsed, 1), "cpu_s": round(cpu, 1)})
            if log:
                stats_text = "".join(f"  {k} {m:.4f}" for k, m in zip(stat_names, mean[1:]))
                log(f"step {step + 1:6d}/{tc.steps}  loss {mean[0]:.4f}{stats_text}  "
                    f"lr {lr:.2e}  {elapsed:7.1f}s (cpu {cpu:.0f}s)", flush=True)
            window = []
        if on_snapshot and snapshot_every and (step + 1) % snapshot_every == 0 and step + 1 < tc.steps:
            on_snapshot(step + 1, {name: t.clone() for name, t in zip(names, ema)})
        if resume_path is not None and resume_every and (step + 1) % resume_every == 0 and step + 1 < tc.steps:
            save_resume(step + 1)
    ema_state = {name: t.clone() for name, t in zip(names, ema)}
    return {"ema": ema_state, "model": {k: v.detach().clone() for k, v in mar.state_dict().items()},
            "history": history, "seconds": time.time() - start}


# The command a run records (engine.builtin.train and the train_* modules) -------------------
def _command_line(args) -> str:
    """The equivalent `python -m engine train` command with every option spelled out."""
    parts = ["python -m engine train"]
    for key, value in vars(args).items():
        if key in ("func", "command") or value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        parts.append(flag if value is True else f"{flag} {value}")
    return " ".join(parts)
