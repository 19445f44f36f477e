"""Continuous causal AR ("causal"): the MAR paper's AR baseline and Fluid's raster variant. A causal
transformer over the tokens in raster order (or a given fixed order) with a static KV cache; the
output at each position conditions MAR's diffusion head for the next token. Its module is
engine/models/causal.py; there is no published checkpoint, so the engine format is the format.

Sampling (`CausalModel.sample_tokens`): one prefill of the start position, then one decode step per
token against a static KV cache allocated once per (batch, length, dtype, device). Each step the
transformer runs the 1 new row per image (2 with CFG: the batch doubled as [cond; null]) and the
model's head backend (reference / native / triton) runs the diffusion loop on those rows with the
per-row cfg scales and temperatures, the shape those head loops are fastest at. An image takes L
steps (L = seq_len tokens); `num_iter` is accepted only as None or L.

CFG: the null half starts from `fake_latent`, as MAR's. Schedules: "constant", or MAR's "linear"
`1 + (cfg - 1) * t / L` with t = s + 1 the number of tokens generated once step s is done (MAR's
`L - mask_len`; float32 arithmetic as engine.plan.cfg_scale), so the first token gets
1 + (cfg - 1) / L and the last one cfg.

Random numbers: the generation order is fixed, so the head noise is the only randomness, drawn
per step as MAR's head noise (engine.rng.draw_step_inputs): no generator = torch's global RNG, one
torch.Generator for the batch, or a list with one per image (image i then equals a batch of one
with generator i, up to float rounding of the batched transformer).
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

import numpy as np
import torch

from ..core.conditioning import Condition
from ..core.config import (MAX_CLASSES, MAX_DEPTH, MAX_HEADS, MAX_IMG_SIZE, MAX_MLP_RATIO, MAX_PARAMS,
                      MAX_SEQ_LEN, MAX_STRIDE, MAX_TOKEN_DIM, MAX_WIDTH, ConfigMixin, _block_params,
                      _head_params, check_int_range, parse_int, parse_range, parse_steps)
from ..core.errors import ConfigError, SamplingError
from ..model import Model
from ..core.plan import (MAX_BATCH, PlanStep, SamplingPlan, cfg_scale, check_cfg, check_count,
                    check_schedule, per_image)
from ..core.rng import _draw_one, check_generator, draw_step_inputs
from ..core.protocol import check_image_generator
from ..core.loop import check_finite, run_steps, validate_temperature
from .record import Family
from .mar import depth_of, head_and_mlp_sizes, shape_of
from .slots import SlotPool

FAMILY_NAME = "causal"
# fast= modes (engine.core.fast): DiSA anneals the head's diffusion steps over the positions.
# (No lazy: a causal step already computes one new position against a KV cache; no speculative:
# see docs/fast.md.)
FAST_MODES = ("disa",)


def parse_order(name: str, value):
    """A generation order: None (raster) or a list / tuple of integer positions."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"config field {name} must be None (raster) or a list of token positions, "
                          f"got {type(value).__name__}")
    if len(value) > MAX_SEQ_LEN:
        raise ConfigError(f"config field {name} has {len(value)} entries, over MAX_SEQ_LEN = {MAX_SEQ_LEN}")
    return tuple(parse_int(f"{name}[{i}]", v) for i, v in enumerate(value))


def check_order(order, seq_len: int, name: str = "order", error=ConfigError) -> tuple:
    """`order` as a tuple, or `error` unless it is a permutation of 0..seq_len-1."""
    if len(order) != seq_len or sorted(order) != list(range(seq_len)):
        raise error(f"{name} must be a permutation of the {seq_len} token positions 0..{seq_len - 1}, "
                    f"got {list(order)[:8]}{'...' if len(order) > 8 else ''} ({len(order)} entries)")
    return tuple(order)


@dataclass
class CausalConfig(ConfigMixin):
    """Sizes of engine.models.causal.CausalAR and the engine's sampling options (the tokenizer
    fields and the diffusion head are MAR's)."""
    img_size: int = 256
    vae_stride: int = 16
    patch_size: int = 1
    vae_embed_dim: int = 16
    embed_dim: int = 768
    depth: int = 24
    num_heads: int = 12
    mlp_ratio: float = 4.0
    class_num: int = 1000
    diffloss_d: int = 6
    diffloss_w: int = 1024
    num_sampling_steps: str = field(default="100", metadata={"coerce": parse_steps})
    tokenizer: str = "vae"
    clip_denoised: bool = False
    clip_range: tuple = field(default=(-1.0, 1.0), metadata={"coerce": parse_range})
    # The generation order the model was trained with: None = raster (0..L-1).
    order: tuple | None = field(default=None, metadata={"coerce": parse_order, "optional": True})

    def __post_init__(self):
        self._coerce_and_validate()

    @property
    def seq_h(self) -> int:
        return self.img_size // self.vae_stride // self.patch_size

    @property
    def seq_len(self) -> int:
        return self.seq_h * self.seq_h

    @property
    def token_dim(self) -> int:
        return self.vae_embed_dim * self.patch_size ** 2

    @property
    def generation_order(self) -> tuple:
        return tuple(range(self.seq_len)) if self.order is None else self.order

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["order"] = None if self.order is None else list(self.order)
        return d

    def describe(self) -> str:
        return (f"img_size={self.img_size}, vae_stride={self.vae_stride}, patch_size={self.patch_size}, "
                f"vae_embed_dim={self.vae_embed_dim}, blocks={self.depth}x{self.embed_dim} "
                f"({self.num_heads} heads), head={self.diffloss_d}x{self.diffloss_w}, class_num={self.class_num}")

    def validate(self) -> None:
        ranges = {"img_size": (1, MAX_IMG_SIZE), "vae_stride": (1, MAX_STRIDE), "patch_size": (1, MAX_STRIDE),
                  "vae_embed_dim": (1, MAX_TOKEN_DIM), "embed_dim": (1, MAX_WIDTH), "depth": (0, MAX_DEPTH),
                  "num_heads": (1, MAX_HEADS), "class_num": (1, MAX_CLASSES), "diffloss_d": (0, MAX_DEPTH),
                  "diffloss_w": (1, MAX_WIDTH)}
        for name, (low, high) in ranges.items():
            check_int_range(name, getattr(self, name), low, high)
        if self.img_size % (self.vae_stride * self.patch_size):
            raise ConfigError(f"img_size {self.img_size} is not a multiple of vae_stride*patch_size "
                              f"= {self.vae_stride * self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ConfigError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if not 0 < self.mlp_ratio <= MAX_MLP_RATIO or int(self.embed_dim * self.mlp_ratio) < 1:
            raise ConfigError(f"config field mlp_ratio must be in (0, {MAX_MLP_RATIO}] and give an MLP "
                              f"of width >= 1, got {self.mlp_ratio}")
        if self.token_dim > MAX_TOKEN_DIM:
            raise ConfigError(f"token_dim (vae_embed_dim * patch_size**2) = {self.token_dim} exceeds "
                              f"the engine's limit MAX_TOKEN_DIM = {MAX_TOKEN_DIM}")
        if self.seq_len > MAX_SEQ_LEN:
            raise ConfigError(f"seq_len ((img_size // vae_stride // patch_size)**2) = {self.seq_len} "
                              f"exceeds the engine's limit MAX_SEQ_LEN = {MAX_SEQ_LEN}")
        if self.tokenizer not in ("vae", "pixels"):
            raise ConfigError(f"tokenizer must be 'vae' or 'pixels', got {self.tokenizer!r}")
        if self.clip_range[0] >= self.clip_range[1]:
            raise ConfigError(f"clip_range {self.clip_range} is empty")
        if self.order is not None:
            check_order(self.order, self.seq_len, "config field order")
        if self.estimate_params() > MAX_PARAMS:
            raise ConfigError(f"this configuration ({self.describe()}) has {self.estimate_params():,} "
                              f"parameters, over the engine's limit MAX_PARAMS = {MAX_PARAMS:,}")

    def estimate_params(self) -> int:
        """Parameters of engine.models.causal.CausalAR(config), from the sizes alone (exact)."""
        d, length, c = self.embed_dim, self.seq_len, self.token_dim
        return (self.class_num * d + d                  # class_emb, fake_latent
                + c * d + d + 2 * d                     # z_proj, z_proj_ln
                + (2 * length + 1) * d                  # pos_embed_learned, target_pos_embed_learned
                + self.depth * _block_params(d, self.mlp_ratio) + 2 * d
                + _head_params(c, d, self.diffloss_w, self.diffloss_d))


# The built-in digits model's sizes, and a MAR-B-shaped model (24 blocks of 768: MAR-B's 12 + 12)
# on MAR's ImageNet tokens (KL-16 latents, 16 x 16 tokens) for benchmarks.
PRESETS: dict[str, dict] = {
    "causal_digits": dict(img_size=16, vae_stride=1, patch_size=4, vae_embed_dim=1, tokenizer="pixels",
                          embed_dim=128, depth=4, num_heads=4, mlp_ratio=4.0, class_num=10,
                          diffloss_d=3, diffloss_w=128, num_sampling_steps="50", clip_denoised=True,
                          clip_range=(-1.0, 1.0)),
    "causal_base": dict(embed_dim=768, depth=24, num_heads=12, diffloss_d=6, diffloss_w=1024),
}
CausalConfig.PRESETS = PRESETS


def infer_sizes(state: dict) -> dict:
    """Configuration fields the tensor shapes determine (not num_heads, nor the token grid when
    patch / stride are not given: seq_len is read from the position table)."""
    out: dict = {}
    if shape_of(state, "class_emb.weight"):
        out["class_num"], out["embed_dim"] = shape_of(state, "class_emb.weight")
    out["depth"] = depth_of(state, "blocks")
    out["diffloss_d"] = depth_of(state, "diffloss.net.res_blocks")
    out.update(head_and_mlp_sizes(state, None))
    fc1 = shape_of(state, "blocks.0.mlp.fc1.weight")
    if fc1 and out.get("embed_dim"):
        out["mlp_ratio"] = fc1[0] / out["embed_dim"]
    return out


# The sampling plan: one token per step, fixed shapes ----------------------------------------------
def causal_plan(bsz: int, seq_len: int, cfg=1.0, cfg_schedule="linear", fast=None,
                model_steps: int | None = None) -> SamplingPlan:
    """A SamplingPlan of L steps of one token each, with per-image cfg scales and schedules.
    Step s's `mask_len` is the tokens still unknown after it, L - s - 1, so MAR's linear
    schedule gives 1 + (cfg - 1) * (s + 1) / L (float32, engine.plan.cfg_scale)."""
    cfgs = per_image("cfg", cfg, bsz, check_cfg)
    schedules = per_image("cfg_schedule", cfg_schedule, bsz, check_schedule)
    use_cfg = any(c != 1.0 for c in cfgs)
    steps = []
    for s in range(seq_len):
        mask_len = seq_len - s - 1
        with np.errstate(over="ignore"):
            scales = tuple(cfg_scale(c, sch, mask_len, seq_len) if use_cfg else 1.0
                           for c, sch in zip(cfgs, schedules))
        if not all(math.isfinite(v) for v in scales):
            raise SamplingError(f"cfg={cfgs[0]!r} with its schedule overflows float32 at step {s}")
        head_steps = None
        if fast is not None and fast.disa is not None:   # DiSA's schedule over the L positions
            head_steps = fast.disa.steps(s, seq_len, model_steps)
            head_steps = None if head_steps == model_steps else head_steps
        steps.append(PlanStep(s, seq_len - s, mask_len, mask_len, scales, head_steps))
    return SamplingPlan(bsz, seq_len, seq_len, cfgs, schedules, tuple(steps), fast)


class CausalModel(Model):
    """A loaded continuous causal AR model; `sample_tokens` has MAR's signature and output
    ([B, vae_embed_dim, H, W] unpatchified tokens; pixels in [-1, 1] for pixel models)."""

    family = FAMILY_NAME

    def __init__(self, module, backend="auto", num_sampling_steps=None, cuda_graphs: bool = True,
                 precision: str = "fp32"):
        super().__init__(module, backend=backend, num_sampling_steps=num_sampling_steps,
                         cuda_graphs=cuda_graphs, precision=precision)
        self._cache = None
        self._lock = threading.Lock()   # the static cache serves one call at a time

    def __repr__(self) -> str:
        return (f"CausalModel({self.config.describe()}, steps={self.config.num_sampling_steps!r}, "
                f"backend={self.backend.name!r}, device={self.device})")

    def to(self, device) -> "CausalModel":
        self._cache = None
        return super().to(device)

    fast_modes = FAST_MODES

    @torch.no_grad()
    def sample_tokens(self, bsz: int, num_iter: int | None = None, cfg=1.0, cfg_schedule="linear",
                      labels=None, temperature=1.0, progress: bool = False, generator=None, order=None,
                      fast="exact"):
        """Sample [bsz, vae_embed_dim, h, w] tokens, one per step in `order` (default: the
        model's, raster unless it was trained otherwise). `num_iter` must be None or seq_len
        (an AR image takes one step per token). `cfg`, `cfg_schedule` ("linear" / "constant")
        and `temperature` take one value or one per image; `generator`: None (torch's global
        RNG), one torch.Generator, or a list with one per image. `fast`: "exact" or "disa"
        (docs/fast.md)."""
        c = self.config
        bsz = check_count("bsz", bsz, MAX_BATCH)
        fast = self.check_fast(fast)
        if num_iter is not None and (isinstance(num_iter, bool) or num_iter != c.seq_len):
            raise SamplingError(f"a causal AR image takes one step per token: num_iter must be None or "
                                f"seq_len = {c.seq_len}, got {num_iter!r}")
        condition = Condition.labels(labels, bsz, c.class_num, self.device)
        order = c.generation_order if order is None else check_order(
            parse_order_arg(order), c.seq_len, "order", SamplingError)
        plan = causal_plan(bsz, c.seq_len, cfg, cfg_schedule, fast, self.head.num_steps)
        temperatures = per_image("temperature", temperature, bsz, validate_temperature)
        generator = check_generator(generator, bsz)
        tokens = self._run(plan, condition, order, temperatures, generator, progress)
        check_finite(tokens)
        return self.mar.unpatchify(tokens)

    # The family protocol (engine/core/protocol.py) --------------------------------------------
    DEFAULTS = {"num_iter": None, "cfg": 1.0, "cfg_schedule": "linear", "temperature": 1.0, "fast": "exact"}

    def setting_checks(self) -> dict:
        seq_len = self.config.seq_len

        def image_length(value):
            if value is not None and (isinstance(value, bool) or value != seq_len):
                raise SamplingError(f"a causal AR image takes one step per token: num_iter must be None or "
                                    f"seq_len = {seq_len}, got {value!r}")
            return value
        return {**super().setting_checks(), "num_iter": image_length}

    def batcher(self, max_images: int = 32) -> "CausalBatcher":
        return CausalBatcher(self, max_images)

    # The KV-cached loop -----------------------------------------------------------------------
    def cache_for(self, batch: int, dtype) -> object:
        """The static KV cache of this batch (doubled rows with CFG) and dtype: allocated once,
        reused by every call of that shape."""
        cache = self._cache
        if cache is None or cache.key[0] != batch or cache.k.dtype != dtype or cache.k.device != self.device:
            self._cache = None   # free the old buffers before allocating new ones
            cache = self._cache = self.mar.new_cache(batch, dtype)
        return cache

    def decode_step(self, prev, input_pos, cache, seq_pos, use_cfg: bool) -> torch.Tensor:
        """One graph-safe step: feed the tokens sampled last step (`prev` [B, C]; doubled for CFG)
        at sequence position `input_pos` ([1] int64 tensor), return the head conditions z
        [B', D] float32 of the next token. Fixed shapes, no host synchronisation: what
        torch.compile(fullgraph=True) traces, one graph for every position."""
        tokens = torch.cat([prev, prev]) if use_cfg else prev
        return self.mar.decode(tokens, input_pos, cache, seq_pos).float()

    def _autocast(self):
        dtype = self.autocast_dtype
        return torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None)

    def _run(self, plan, condition, order, temperatures, generator, progress) -> torch.Tensor:
        """Tokens [B, L, C] in position order."""
        m, device, dim = self.mar, self.device, self.config.token_dim
        bsz, use_cfg = plan.bsz, plan.use_cfg
        cfg_table = plan.cfg_table(device)                              # [L, B]
        temps = torch.tensor(temperatures, dtype=torch.float32, device=device)
        cfg_images = [v != 1.0 for v in plan.cfgs]
        order_t = torch.tensor(order, dtype=torch.int64, device=device)
        out = torch.zeros(bsz, plan.seq_len, dim, device=device)
        with self._lock:
            with self._autocast():
                seq_pos = m.position_table(order_t)
                start = m.class_embedding(condition.value, bsz, use_cfg)
            cache = self.cache_for(start.shape[0], self.autocast_dtype or torch.float32)
            input_pos = torch.zeros(1, dtype=torch.int64, device=device)
            fed = {}    # the token sampled last step, fed back at the next

            def step(s: int) -> None:
                with self._autocast():
                    if s == 0:
                        z = m.prefill(start, seq_pos, cache).float()
                    else:
                        input_pos.add_(1)
                        z = self.decode_step(fed["prev"], input_pos, cache, seq_pos, use_cfg)
                head = self.head_for(plan.steps[s].head_steps)
                x, noise = draw_step_inputs(head, plan, plan.steps[s], generator, device, dim, cfg_images)
                fed["prev"] = self.backend.head_loop(head, z, x, noise, cfg_table[s] if use_cfg else None, temps)
                out[:, s] = fed["prev"]

            run_steps(len(plan.steps), step, progress, unit="token")
        tokens = torch.empty_like(out)
        tokens[:, order_t] = out             # generation order -> position order
        return tokens


def parse_order_arg(order) -> tuple:
    try:
        return parse_order("order", order)
    except ConfigError as err:
        raise SamplingError(str(err).replace("config field ", "")) from None


class CausalImage:
    """One image in flight: its per-step cfg scales, temperature, generator, the tokens sampled so
    far (`k` of them, in generation order) and its KV-cache rows."""

    def __init__(self, label, scales, temperature, generator, seq_len: int, dim: int, device):
        self.label, self.scales, self.temperature, self.generator = label, scales, temperature, generator
        self.use_cfg = any(v != 1.0 for v in scales)
        self.out = torch.zeros(1, seq_len, dim, device=device)
        self.k, self.rows, self.prev = 0, [], None
        self.head_steps = [None] * seq_len   # per step: its head's length (fast "disa"), None: the model's

    @property
    def done(self) -> bool:
        return self.k >= self.out.shape[1]

    @property
    def num_steps(self) -> int:
        return self.out.shape[1]

    @property
    def shape_key(self) -> tuple:
        return ("prefill",) if self.k == 0 else ("decode",)


class CausalBatcher:
    """Images of a causal continuous model in flight at once (continuous batching): each owns
    rows of one static KV cache (engine/families/slots.py); a step prefills the new images and
    decodes every other row at its own position, then runs ONE head call over all images'
    rows with per-row cfg scales and temperatures (as engine.core.loop.advance: an image without
    CFG repeats its conditional row at scale 1). Noise is drawn per image as `sample_tokens`
    draws it for a batch of one with a list of one generator."""

    def __init__(self, model: CausalModel, max_images: int):
        self.model = model
        dtype = model.autocast_dtype or torch.float32
        self.pool = SlotPool(lambda rows: model.mar.new_cache(rows, dtype), initial_rows=min(2 * max_images, 64))
        order = torch.tensor(model.config.generation_order, dtype=torch.int64, device=model.device)
        with model._autocast():
            self.seq_pos = model.mar.position_table(order)
        self.order = order

    def add(self, label=None, texts=None, settings=None, generator=None) -> CausalImage:
        model, s, c = self.model, settings, self.model.config
        Condition.labels(None if label is None else [label], 1, c.class_num, model.device)
        plan = causal_plan(1, c.seq_len, s["cfg"], s["cfg_schedule"], model.check_fast(s.get("fast")),
                           model.head.num_steps)
        check_image_generator(generator)
        scales = [step.cfg_scales[0] for step in plan.steps]
        image = CausalImage(label, scales, validate_temperature(s["temperature"]), generator, c.seq_len,
                            c.token_dim, model.device)
        image.head_steps = [step.head_steps for step in plan.steps]
        return image

    def release(self, image) -> None:
        self.pool.release(image)

    @torch.no_grad()
    def step(self, images: list) -> list:
        """One token for every image given (any subset of those in flight); returns those
        finished (released). The decode pass runs over every row held (a row whose image is not
        given rewrites its cache position with the same values), so a retried subset sees the
        shapes of the full step. Raising, it releases the rows claimed for joining images."""
        if len(images) != len({id(im) for im in images}) or any(im.done for im in images):
            raise SamplingError("step() takes each image in flight once, none done")
        new = [im for im in images if im.k == 0]
        try:
            out = self._next_tokens(images, new)
        except BaseException:
            for im in new:
                self.pool.release(im)
            raise
        finished = []
        for i, im in enumerate(images):
            im.prev = out[i:i + 1]
            im.out[:, im.k] = im.prev
            im.k += 1
            if im.done:
                self.pool.release(im)
                finished.append(im)
        return finished

    def _next_tokens(self, images: list, new: list) -> torch.Tensor:
        """Each image's next token [len(images), dim]; claims rows for the `new` images."""
        model, pool, m, device = self.model, self.pool, self.model.mar, self.model.device
        held = pool.used
        with model._autocast():
            if held:
                by_row = [owner for owner, _ in pool.owner]
                prev = torch.cat([owner.prev for owner in by_row])
                pos = torch.tensor([owner.k for owner in by_row], dtype=torch.int64, device=device)
                decoded = m.decode(prev, pos, pool.cache.rows(0, held), self.seq_pos).float()
            starts = []
            for im in new:
                pool.claim(im, 2 if im.use_cfg else 1)
                labels = None if im.label is None else torch.tensor([im.label], device=device)
                starts.append(m.class_embedding(labels, 1, im.use_cfg))
            if new:
                prefilled = m.prefill(torch.cat(starts), self.seq_pos, pool.cache.rows(held, pool.used)).float()
        z_of = lambda r: decoded[r:r + 1] if r < held else prefilled[r - held:r - held + 1]  # noqa: E731
        by_head: dict = {}   # fast "disa": images whose head has the same length share a call
        for im in images:
            by_head.setdefault(im.head_steps[im.k], []).append(im)
        outs = {}
        for head_steps, members in by_head.items():
            outs.update(self._head_call(model.head_for(head_steps), members, z_of))
        return torch.cat([outs[id(im)] for im in images])

    def _head_call(self, head, images, z_of) -> dict:
        model, device = self.model, self.model.device
        guided = any(im.use_cfg for im in images)
        dim = model.config.token_dim
        xs, conds, nulls, zc, zn, scales, temps = [], [], [], [], [], [], []
        for im in images:
            x, noise = _draw_one(head.num_steps, 1, dim, im.use_cfg, im.generator, device)
            xs.append(x)
            conds.append(noise[:, :1])
            zc.append(z_of(im.rows[0]))
            if guided:
                nulls.append(noise[:, 1:] if im.use_cfg else torch.zeros_like(noise))
                zn.append(z_of(im.rows[1]) if im.use_cfg else zc[-1])
                scales.append(im.scales[im.k])
            temps.append(im.temperature)
        scale_rows = torch.tensor(scales, dtype=torch.float32, device=device) if guided else None
        out = model.backend.head_loop(head, torch.cat(zc + zn), torch.cat(xs), torch.cat(conds + nulls, dim=1),
                                      scale_rows, torch.tensor(temps, dtype=torch.float32, device=device))
        return {id(im): out[i:i + 1] for i, im in enumerate(images)}

    def tokens(self, images: list) -> torch.Tensor:
        out = torch.cat([im.out for im in images])
        tokens = torch.empty_like(out)
        tokens[:, self.order] = out          # generation order -> position order
        check_finite(tokens)
        return self.model.mar.unpatchify(tokens)

    def preview(self, images: list) -> torch.Tensor:
        """The positions sampled so far; the others hold 0 (as the sampler starts them)."""
        out = torch.cat([im.out for im in images])
        tokens = torch.empty_like(out)
        tokens[:, self.order] = out
        return self.model.mar.unpatchify(tokens)


def _family() -> Family:
    from ..models.causal import CausalAR

    return Family(name=FAMILY_NAME, config_cls=CausalConfig, presets=PRESETS, module_cls=CausalAR,
                  model_cls=CausalModel, marker_keys=("class_emb.weight", "target_pos_embed_learned"),
                  infer_sizes=infer_sizes, head_fields=("num_heads",))


FAMILY = _family()
