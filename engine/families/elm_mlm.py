"""ELM's masked family ("elm-mlm"): Pepper-lll/LMforImageGeneration `llama/mlm_model.py`
`Transformer` with its MaskGIT-style `generate_cfg`, reproduced exactly, every step one
graph-safe function of fixed shapes (no host synchronisation inside the loop).

Compatibility: as published, `ModelArgs` has no `model_type` field while `Transformer.__init__`
reads `config.model_type`, so the published model does not construct (AttributeError) until the
attribute is added (e.g. `args.model_type = "c2i"`). The engine needs no such field (it accepts
and ignores one). Checkpoints are bare state dicts, as ELM ships them (mlmL-1-16.pth ...).

Published behaviour reproduced (quirks included). One step of `generate_cfg(idx, cond, num_iter,
...)`, ratio = (step + 1) / num_iter:
  * `idx` is ignored: every call starts from all positions masked (the mask id 2**code_dim).
  * CFG always doubles the batch with the null class `num_classes` (also at cfg_scale 1:
    logits `u + (c - u) * 1`). Guidance schedules: constant s; linear 1 + (s - 1) ratio;
    powercos 1 + (s - 1) (1 - cos(ratio**scale_pow * pi)) / 2 (the published one prints each
    step's scale; the engine does not). An unknown schedule: the published code fails (its
    `cfg` is unbound); here SamplingError. `scale_pow` only matters for powercos.
  * Every position is drawn, masked or not: `Categorical(logits=guided).sample()`, i.e.
    softmax(logits - logsumexp(logits)) and torch.multinomial's exponential race over
    [B * S * token_each, V] (one draw of torch's global RNG per step, reproduced from the same
    state without host syncs). No temperature, no top-k: `temperature` only scales the
    confidence noise below and `top_k` is accepted and unused (ELM's sample.py passes
    --top-k 10 by default; it has no effect on the masked model).
  * Known sub-tokens keep their value. Confidence of a sub-token: the guided softmax
    probability of its (new or kept) value, +inf where it was known; per position
    mean_t(log p_t + temperature * (1 - ratio) * g_t), g ~ Gumbel from numpy's global RNG
    (`np.random.gumbel`, float64, times the scale in float64, then float32), drawn every step
    (also the last, where the scale is 0). So a position stays known unless all its sub-tokens
    are re-drawn by remask.
  * remask (steps < int(num_iter * 0.5)): a known sub-token whose fresh draw differs from its
    value gets the fresh draw's probability as confidence (its value is kept unless the
    position is masked).
  * Positions masked for the next step: those with confidence <= the n-th smallest of their
    image (ties at the cut all masked), n = max(1, min(U - 1, floor(block_size * r))), r =
    cos(pi / 2 * ratio) (mask_schtype 'cos') or 1 - ratio ('linear'), U = the number of unknown
    positions of image 0 (the published code takes mask_len[0] for the whole batch). Computed
    on the device: a sort and a gather, no host sync.
  * Returns (the last step's indices [B, block_size, token_each] with every position filled,
    its guided logits [B, block_size * token_each, 2**code_dim]). The last step's re-masking is
    computed and discarded. num_iter may exceed block_size (n is then 1 at every step).

`sample_tokens` (the engine's idiom): per-image cfg / schedule / temperature, optional top-k /
top-p on the draw (engine additions; confidence then uses the filtered distribution), and
random numbers from torch generators: one generator drives the batch; a list gives image i its
own (each step: the draw's exponential race, then Gumbel noise as -log(Exp(1)) in float32),
drawn as a batch of one would. With a generator U is counted per image, so with a list image i
equals a solo run with generator i. generator None draws as generate_cfg does (torch's and
numpy's global RNGs, U of image 0).
When no image uses CFG the null half is not run.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

import numpy as np
import torch

from ..ops.categorical import check_top_k, check_top_p
from ..core.config import MAX_CLASSES, MAX_PARAMS, MAX_SEQ_LEN, ConfigMixin
from ..core.config import check_int_range as _check_range
from ..core.errors import ConfigError, SamplingError
from ..core.plan import FLOAT32_MAX, MAX_BATCH, MAX_NUM_ITER, check_count, per_image
from ..models.elm_mlm import refine_step
from ..core.protocol import check_image_generator, resolve_settings
from ..core.loop import run_steps
from ..core.rng import check_generator
from .record import Family
from .discrete import BAETokens
from .slots import StepImage
from .elm import (MAX_CODE_DIM, MAX_TOKEN_EACH, ClassGrid, ELMModel, LlamaSizes, check_draws, config_of,
                  is_elm, patch_generate_cfg)
from .mar import depth_of, shape_of

FAMILY_NAME = "elm-mlm"
# The published GPT_models presets of llama/mlm_model.py: layers, heads, width (no GPT-2B).
PRESETS: dict[str, dict] = {
    name: dict(n_layer=layers, n_head=heads, dim=dim)
    for name, (layers, heads, dim) in {
        "GPT-B": (12, 12, 768), "GPT-L": (24, 16, 1024), "GPT-XL": (36, 20, 1280),
        "GPT-XXL": (48, 24, 1536), "GPT-XXXL": (48, 40, 2560)}.items()
}
# ModelArgs fields the masked model only uses in training, or stores and never reads
# (use_adaLN, norm_type: always RMSNorm, vocab_size: replaced by 2**code_dim + 1), plus the
# model_type the published ModelArgs lacks: accepted and ignored.
TRAINING_ONLY = frozenset({
    "mask_ratio_min", "mask_ratio_max", "mask_ratio_mu", "mask_ratio_std", "pause_num", "use_adaLN",
    "smoothing", "gen_iter", "maskpersample", "mask_schstep", "norm_type", "initializer_range",
    "token_dropout_p", "attn_dropout_p", "resid_dropout_p", "ffn_dropout_p", "drop_path_rate",
    "caption_dim", "vocab_size", "max_batch_size", "max_seq_len", "model_type"})
CFG_SCHEDULES = ("linear", "constant", "powercos")
MASK_SCHEDULES = ("cos", "linear")
POS_TYPES = ("rope2d", "rope1d")
NOISE_CHUNK = 1 << 24      # numpy Gumbel values uploaded at a time (one host->device copy each)


@dataclass
class ELMMLMConfig(LlamaSizes, ClassGrid, ConfigMixin):
    """The masked model's `ModelArgs` (same names and defaults) for the parts that sampling
    reads, plus one engine field. Options the engine does not implement are fields too, so a
    value it cannot run is refused by name instead of silently ignored."""
    mask_schtype: str = "cos"
    pause: bool = False
    token_each: int = 4
    cls_row: bool = False          # only read by the published sincos path (not implemented)
    pos_type: str = "rope2d"
    code_dim: int = 16
    dim: int = 4096
    n_layer: int = 32
    n_head: int = 32
    n_kv_head: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    cls_token_num: int = 1
    block_size: int = 256
    # Engine addition: the SwiGLU hidden width when the weights tell it (see ELMConfig).
    ffn_hidden_dim: int | None = field(default=None)

    def __post_init__(self):
        self._coerce_and_validate()

    @property
    def vocab_size(self) -> int:
        """Sub-token values (the logits' width)."""
        return 2 ** self.code_dim

    @property
    def mask_id(self) -> int:
        return 2 ** self.code_dim

    @property
    def embedding_rows(self) -> int:
        """Rows of the token table, the heads and mlm_layer.bias: values + mask (+ pause)."""
        return 2 ** self.code_dim + 1 + (1 if self.pause else 0)

    def describe(self) -> str:
        return (f"dim={self.dim}, n_layer={self.n_layer}, n_head={self.n_head}, n_kv_head={self.n_kv_head}, "
                f"token_each={self.token_each}, code_dim={self.code_dim}, pause={self.pause}, "
                f"num_classes={self.num_classes}, block_size={self.block_size}, ffn hidden={self.hidden_dim}")

    def validate(self) -> None:
        if self.pos_type not in POS_TYPES:
            raise ConfigError(f"config field pos_type={self.pos_type!r} is not supported: the engine "
                              f"implements the published {POS_TYPES} (not 'sincos')")
        if self.mask_schtype not in MASK_SCHEDULES:
            raise ConfigError(f"config field mask_schtype={self.mask_schtype!r} is not one of {MASK_SCHEDULES} "
                              "(the published generate_cfg fails on others: its mask_ratio is unbound)")
        if self.cls_token_num != 1:
            raise ConfigError(f"config field cls_token_num={self.cls_token_num!r}: the published masked model "
                              "only runs with cls_token_num = 1 (its RoPE table no longer fits the sequence)")
        ranges = {"token_each": (1, MAX_TOKEN_EACH), "code_dim": (1, MAX_CODE_DIM),
                  "num_classes": (1, MAX_CLASSES), "block_size": (1, MAX_SEQ_LEN)}
        for name, (low, high) in ranges.items():
            _check_range(name, getattr(self, name), low, high)
        self.check_llama_sizes()
        self.check_grid()
        if (self.block_size + 1) * self.token_each > MAX_SEQ_LEN:
            raise ConfigError(f"(block_size + 1) * token_each = {(self.block_size + 1) * self.token_each} "
                              f"sequence elements exceed the engine's limit {MAX_SEQ_LEN}")
        if self.estimate_params() > MAX_PARAMS:
            raise ConfigError(f"this configuration ({self.describe()}) has {self.estimate_params():,} "
                              f"parameters, over the engine's limit MAX_PARAMS = {MAX_PARAMS:,}")

    def estimate_params(self) -> int:
        """Parameters of engine.models.elm_mlm.ELMMLMTransformer(config), from the sizes (exact)."""
        d, t, rows = self.dim, self.token_each, self.embedding_rows
        attn = d * (self.n_head + 2 * self.kv_heads) * self.head_dim + d * d
        layer = attn + 3 * d * self.hidden_dim + 2 * d
        unused = self.block_size * d + (t * d * d if t > 1 else 0) + t * d * rows
        mlm = d * d + d + 2 * d + rows
        return self.class_rows * d + rows * d + self.n_layer * layer + d + mlm + unused


ELMMLMConfig.PRESETS = PRESETS
ELMMLMConfig.IGNORED = TRAINING_ONLY


def infer_sizes(state: dict) -> dict:
    """The ModelArgs fields a bare masked-model state dict determines: num_classes and dim (the
    class table, num_classes + 1 rows as with ModelArgs' class_dropout_prob), code_dim and pause
    (the token table has 2**code_dim + 1 (+ 1) rows), token_each (the heads), block_size
    (pos_embed), n_layer, the SwiGLU width, n_head (a preset of that width and depth) and
    n_kv_head (given n_head). Not among them: norm_eps, rope_base, mask_schtype."""
    out: dict = {}
    shape = lambda key: shape_of(state, key)  # noqa: E731
    table = shape("cls_embedding.embedding_table.weight")
    if table:
        out["num_classes"], out["dim"] = table[0] - 1, table[1]
    rows = (shape("tok_embedder.weight") or (0,))[0]
    for pause in (False, True):
        values = rows - 1 - pause
        if values > 1 and values & (values - 1) == 0:
            out["code_dim"], out["pause"] = values.bit_length() - 1, pause
            break
    out["token_each"] = 1 if shape("output.weight") else depth_of(state, "output")
    if shape("pos_embed.weight"):
        out["block_size"] = shape("pos_embed.weight")[0]
    out["n_layer"] = depth_of(state, "layers")
    w1 = shape("layers.0.feed_forward.w1.weight")
    if w1:
        out["ffn_hidden_dim"] = w1[0]
    for preset in PRESETS.values():
        if preset["dim"] == out.get("dim") and preset["n_layer"] == out["n_layer"]:
            out["n_head"] = preset["n_head"]
    wqkv = shape("layers.0.attention.wqkv.weight")
    if wqkv and "n_head" in out and wqkv[0] != 3 * out["dim"]:
        out["n_kv_head"] = (wqkv[0] - out["dim"]) // (2 * (out["dim"] // out["n_head"]))
    return out


# The published per-step numbers (host floats, computed before the loop) -------------------------
def cfg_at(schedule: str, cfg_scale, step: int, num_iter: int, scale_pow=1.0):
    ratio = 1.0 * (step + 1) / num_iter
    if schedule == "linear":
        return 1.0 + (cfg_scale - 1.0) * ratio
    if schedule == "constant":
        return cfg_scale
    if schedule == "powercos":
        scale_step = (1 - np.cos((((step + 1) / num_iter) ** scale_pow) * math.pi)) * 1 / 2
        return (cfg_scale - 1) * scale_step + 1
    raise SamplingError(f"unknown cfg_schedule {schedule!r}; expected one of {CFG_SCHEDULES}")


def mask_floor_at(mask_schtype: str, step: int, num_iter: int, block_size: int) -> int:
    """floor(block_size * mask_ratio): how many positions the schedule re-masks after `step`
    (before the published clamp to [1, unknown - 1])."""
    ratio = 1.0 * (step + 1) / num_iter
    mask_ratio = np.cos(math.pi / 2.0 * ratio) if mask_schtype == "cos" else 1.0 - ratio
    return int(np.floor(block_size * mask_ratio))


def _check_schedule(schedule) -> str:
    if schedule not in CFG_SCHEDULES:
        raise SamplingError(f"unknown cfg_schedule {schedule!r}; expected one of {CFG_SCHEDULES}")
    return schedule


def _check_number(name: str, value, low=None) -> float:
    """A finite number within float32 range (and >= low when given)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(value) or abs(value) > FLOAT32_MAX or (low is not None and value < low):
        what = "a finite number" + ("" if low is None else f" >= {low}")
        raise SamplingError(f"{name} must be {what} (within float32 range), got {value!r}")
    return value


class ELMMLMModel(BAETokens):
    """A loaded ELM masked model. `generate_cfg` has the published signature and results;
    `sample_tokens` is the engine's idiom (per-image settings and generators)."""

    family = FAMILY_NAME

    def __init__(self, module, backend="auto", cuda_graphs: bool = True, precision: str = "fp32"):
        if backend not in ("auto", "reference"):
            raise ConfigError(f"ELM models run in PyTorch: backend must be 'auto' or 'reference' (the "
                              f"diffusion-head backends do not apply), got {backend!r}")
        if precision != "fp32":
            raise ConfigError(f"ELM models run in float32 (precision='fp32'), got precision={precision!r}")
        self.module = module.eval().requires_grad_(False)
        self.config = module.config
        self.backend_name, self.precision, self.cuda_graphs = "reference", precision, cuda_graphs
        self.sampling_defaults: dict = {}
        self._lock = threading.Lock()

    @property
    def device(self) -> torch.device:
        return self.module.device

    def to(self, device) -> "ELMMLMModel":
        self.module.to(device)
        return self

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def __repr__(self) -> str:
        return f"ELMMLMModel({self.config.describe()}, device={self.device})"

    # The published sampler ------------------------------------------------------------------
    @torch.no_grad()
    def generate_cfg(self, idx, cond, num_iter=10, temperature=1.0, top_k=None, cfg_scale=10.0, remask=False,
                     cfg_schedule="constant", scale_pow=1.0):
        """ELM's masked `Transformer.generate_cfg`: same arguments, same return value (indices
        [B, block_size, token_each], last guided logits [B, block_size * token_each, V]) and,
        after torch.manual_seed(s); np.random.seed(s), the same tokens. `idx` and `top_k` are
        unused, as published (top_k is still checked)."""
        if cond is None:
            raise SamplingError("generate_cfg needs cond (class labels [B]; the published code fails "
                                "without them); for unconditional samples use sample_tokens(labels=None)")
        labels = self._labels(cond, None, allow_null=True)
        bsz = labels.shape[0]
        num_iter = check_count("num_iter", num_iter, MAX_NUM_ITER)
        temperature = _check_number("temperature", temperature, low=0)
        check_top_k(top_k)
        cfg_scale = _check_number("cfg_scale", cfg_scale)
        scale_pow = _check_number("scale_pow", scale_pow)
        if not isinstance(remask, (bool, np.bool_)):
            raise SamplingError(f"remask must be True or False, got {remask!r}")
        _check_schedule(cfg_schedule)
        self._need_null()
        scales = [cfg_at(cfg_schedule, cfg_scale, s, num_iter, scale_pow) for s in range(num_iter)]
        table = self._scale_table(scales)
        noise_scales = np.array([[temperature * (1 - (s + 1) / num_iter)] * bsz for s in range(num_iter)])
        return self._run(labels, num_iter, table, noise_scales, bool(remask), None, None, None, shared_count=True)

    # The engine's sampler -----------------------------------------------------------------
    @torch.no_grad()
    def sample_tokens(self, bsz: int, labels=None, num_iter: int = 10, cfg=1.0, cfg_schedule="constant",
                      temperature=1.0, top_k=None, top_p=None, remask: bool = False, scale_pow=1.0,
                      generator=None, progress: bool = False, fast="exact") -> torch.Tensor:
        """Sub-token indices [bsz, block_size, token_each] after `num_iter` refinement steps.
        labels: one class per image, or None for unconditional samples (the null class).
        `cfg`, `cfg_schedule` and `temperature` (the confidence noise scale, as published) take
        one value or one per image; top_k / top_p filter the draw (engine additions, shared).
        generator None: the global RNGs as generate_cfg; one torch.Generator: it alone; a list:
        image i from generator i alone (see the module docstring). `fast`: "exact" only (a
        masked discrete model has no fast mode yet; docs/fast.md)."""
        bsz = check_count("bsz", bsz, MAX_BATCH)
        self.check_fast(fast)
        labels = self._labels(labels, bsz, allow_null=False)
        num_iter = check_count("num_iter", num_iter, MAX_NUM_ITER)
        cfgs = per_image("cfg", cfg, bsz, lambda v: _check_number("cfg", v))
        schedules = per_image("cfg_schedule", cfg_schedule, bsz, _check_schedule)
        temperatures = per_image("temperature", temperature, bsz, lambda v: _check_number("temperature", v, low=0))
        scale_pow = _check_number("scale_pow", scale_pow)
        top_k, top_p = check_top_k(top_k), check_top_p(top_p)
        if not isinstance(remask, (bool, np.bool_)):
            raise SamplingError(f"remask must be True or False, got {remask!r}")
        generator = check_generator(generator, bsz)
        table = None
        if any(v != 1.0 for v in cfgs):
            self._need_null()
            per_step = [[cfg_at(sch, v, s, num_iter, scale_pow) for v, sch in zip(cfgs, schedules)]
                        for s in range(num_iter)]
            if all(row.count(row[0]) == len(row) for row in per_step):
                per_step = [row[0] for row in per_step]
            table = self._scale_table(per_step)
        noise_scales = np.array([[t * (1 - (s + 1) / num_iter) for t in temperatures] for s in range(num_iter)])
        tokens, _ = self._run(labels, num_iter, table, noise_scales, bool(remask), top_k, top_p, generator,
                              shared_count=generator is None, progress=progress)
        return tokens

    # The loop -------------------------------------------------------------------------------
    def refine_step(self, tokens, rows, scale, draw_noise, confidence_noise, mask_floor, remask_on,
                    shared_count: bool = True, top_k=None, top_p=None):
        """One step (engine.models.elm_mlm.refine_step): what torch.compile(fullgraph=True) traces."""
        return refine_step(self.module, tokens, rows, scale, draw_noise, confidence_noise, mask_floor,
                           remask_on, shared_count, top_k, top_p)

    def _run(self, labels, num_iter, table, noise_scales, remask, top_k, top_p, generator, shared_count,
             progress=False):
        c, device = self.config, self.device
        bsz, seq, each = labels.shape[0], c.block_size, c.token_each
        use_cfg = table is not None
        rows = torch.cat([labels, torch.full_like(labels, c.num_classes)]) if use_cfg else labels
        floors = torch.tensor([mask_floor_at(c.mask_schtype, s, num_iter, seq) for s in range(num_iter)],
                              dtype=torch.int64, device=device)
        remask_on = (torch.arange(num_iter, device=device) < int(num_iter * 0.5)) if remask else None
        noise_scales_t = torch.tensor(noise_scales, dtype=torch.float32, device=device)
        with self._lock:
            state = {"tokens": torch.full((bsz, seq, each), c.mask_id, dtype=torch.int64, device=device),
                     "ok": torch.ones((), dtype=torch.bool, device=device), "gumbel": None}

            def step(s: int) -> None:
                if generator is None:
                    draw = torch.empty(bsz * seq * each, c.vocab_size, device=device).exponential_(1)
                    gumbel = state["gumbel"]
                    if gumbel is None or s - gumbel[0] == gumbel[1].shape[0]:
                        gumbel = state["gumbel"] = (s, self._numpy_gumbel(noise_scales[s:], bsz))
                    confidence_noise = gumbel[1][s - gumbel[0]]
                else:
                    draw, g = self._generator_noise(generator, bsz)
                    confidence_noise = g * noise_scales_t[s].view(bsz, 1, 1)
                draw = draw.view(bsz, seq * each, c.vocab_size)
                state["sampled"], state["tokens"], state["logits"] = self.refine_step(
                    state["tokens"], rows, table[s] if use_cfg else None, draw, confidence_noise, floors[s],
                    None if remask_on is None else remask_on[s], shared_count, top_k, top_p)
                state["ok"] = state["ok"] & torch.isfinite(state["logits"]).all()

            run_steps(num_iter, step, progress)
            ok, sampled, logits = state["ok"], state["sampled"], state["logits"]
        if not bool(ok):   # one host sync per call, after the last step
            raise SamplingError("sampling produced NaN/Inf logits: they overflow float32 with these weights "
                                "and settings (cfg)")
        return sampled, logits

    def _numpy_gumbel(self, noise_scales: np.ndarray, bsz: int) -> torch.Tensor:
        """The confidence noise of the next steps [k, B, S, T] from numpy's global RNG, as the
        published per-step `torch.Tensor(scale * np.random.gumbel(size=(B, S, T)))` (one draw of
        several steps is the same stream); at most NOISE_CHUNK values per upload."""
        c = self.config
        per_step = bsz * c.block_size * c.token_each
        k = max(1, min(len(noise_scales), NOISE_CHUNK // per_step))
        g = np.random.gumbel(size=(k, bsz, c.block_size, c.token_each))
        scaled = noise_scales[:k].reshape(k, bsz, 1, 1) * g
        return torch.from_numpy(scaled).to(torch.float32).to(self.device)

    def _generator_noise(self, generator, bsz: int):
        """(draw [B * S * T, V] ~ Exp(1), Gumbel [B, S, T] float32) of one step from a generator
        or, per image, from a list of them (each drawn as a batch of one)."""
        c = self.config
        if isinstance(generator, list):
            parts = [self._generator_noise(g, 1) for g in generator]
            return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        gen_device = generator.device
        draw = torch.empty(bsz * c.block_size * c.token_each, c.vocab_size, device=gen_device)
        draw.exponential_(1, generator=generator)
        g = torch.empty(bsz, c.block_size, c.token_each, device=gen_device).exponential_(1, generator=generator)
        return draw.to(self.device), (-torch.log(g)).to(self.device)

    # The family protocol (engine/core/protocol.py) ------------------------------------------------
    DEFAULTS = {"num_iter": 10, "cfg": 1.0, "cfg_schedule": "constant", "temperature": 1.0, "top_k": None,
                "top_p": None, "fast": "exact"}

    def resolve_settings(self, **given) -> dict:
        """generate's settings (num_iter: refinement steps, generate_cfg's default 10)."""
        checks = {"num_iter": lambda v: check_count("num_iter", v, MAX_NUM_ITER),
                  "cfg": lambda v: v if isinstance(v, (list, tuple)) else _check_number("cfg", v),
                  "cfg_schedule": lambda v: v if isinstance(v, (list, tuple)) else _check_schedule(v),
                  "temperature": lambda v: v if isinstance(v, (list, tuple)) else _check_number("temperature", v, 0),
                  "top_k": check_top_k, "top_p": check_top_p, "fast": self.fast_setting}
        return resolve_settings(given, self.DEFAULTS, checks, self.sampling_defaults)

    def batcher(self, max_images: int = 32) -> "MLMBatcher":
        return MLMBatcher(self)

    # Validation --------------------------------------------------------------------------------
    def _scale_table(self, scales) -> torch.Tensor:
        flat = np.asarray(scales, dtype=np.float64).ravel()
        bad = [s for s in flat if not math.isfinite(s) or abs(s) > FLOAT32_MAX]
        if bad:
            raise SamplingError(f"the cfg schedule gives a scale {bad[0]!r} outside float32 range")
        return torch.tensor(np.asarray(scales, dtype=np.float64), dtype=torch.float32, device=self.device)

    # The AR family's checks (same config fields: class_rows, num_classes, has_null_class).
    _need_null = ELMModel._need_null
    _labels = ELMModel._labels


# Drop-in use with an instance of the published masked Transformer ---------------------------------
def is_elm_mlm(published) -> bool:
    return is_elm(published) and hasattr(published, "mlm_layer")


def accelerate(published, backend="auto", num_sampling_steps=None, **config) -> ELMMLMModel:
    """An engine model with the published masked Transformer's weights (and device; no diffusion
    head, so num_sampling_steps must be None); its
    generate_cfg gives the published tokens for the same seeds."""
    from .checkpoints import build_module

    if num_sampling_steps is not None:
        raise ConfigError("num_sampling_steps is for diffusion-head models; this model draws categorical tokens")
    values = {**config_of(published), **config}
    cfg = ELMMLMConfig.from_dict(values)
    state = {k: v.detach() for k, v in published.state_dict().items() if ".kv_cache." not in k}
    device = next(iter(state.values())).device
    module = build_module(state, cfg, f"{type(published).__name__} instance", FAMILY).to(device)
    return ELMMLMModel(module, backend=backend)


def _family() -> Family:
    from ..models.elm_mlm import ELMMLMTransformer

    return Family(name=FAMILY_NAME, config_cls=ELMMLMConfig, presets=PRESETS, module_cls=ELMMLMTransformer,
                  model_cls=ELMMLMModel, marker_keys=("mlm_layer.fc.weight", "mlm_layer.bias"),
                  infer_sizes=infer_sizes, head_fields=("n_head",), ignored_args=TRAINING_ONLY,
                  default_ema=False,   # bare state dicts, as ELM's sample.py reads them
                  recognises=is_elm_mlm, from_published=accelerate, patch=patch_generate_cfg)


FAMILY = _family()


# Continuous batching (engine.serving) ------------------------------------------------------------
class MLMImage(StepImage):
    """One image in flight: its tokens after `k` refinement steps and its per-step tables."""

    def __init__(self, label, tokens, scales, noise_scales, floors, top_k, top_p, generator):
        self.label, self.tokens, self.scales = label, tokens, scales
        self.noise_scales, self.floors = noise_scales, floors
        self.top_k, self.top_p, self.generator = top_k, top_p, generator
        self.k, self.sampled, self.ok = 0, None, None

    @property
    def num_iter(self) -> int:
        return self.floors.shape[0]

    @property
    def shape_key(self) -> tuple:
        return (self.use_cfg,)


class MLMBatcher:
    """Images of ELM's masked model in flight at once, each at its own refinement step: one
    bidirectional pass per group of images sharing a call's settings (CFG on or off, top-k,
    top-p), with each image's own mask floor, cfg scale, confidence-noise scale and remask flag
    as per-row tensors. An image's noise is drawn from its own generator as `sample_tokens`
    draws it for a batch of one (published per-image counts), so its tokens do not depend on
    what else is in flight."""

    def __init__(self, model):
        self.model = model

    def add(self, label=None, texts=None, settings=None, generator=None) -> MLMImage:
        model, s, c = self.model, settings, self.model.config
        device = model.device
        row = model._labels(None if label is None else [label], 1, allow_null=False)
        num_iter, cfg, temperature = s["num_iter"], float(s["cfg"]), float(s["temperature"])
        scales = None
        if cfg != 1.0:
            model._need_null()
            scales = model._scale_table([cfg_at(s["cfg_schedule"], cfg, k, num_iter) for k in range(num_iter)])
        check_image_generator(generator)
        noise_scales = torch.tensor(np.array([temperature * (1 - (k + 1) / num_iter) for k in range(num_iter)]),
                                    dtype=torch.float32, device=device)
        floors = torch.tensor([mask_floor_at(c.mask_schtype, k, num_iter, c.block_size) for k in range(num_iter)],
                              dtype=torch.int64, device=device)
        tokens = torch.full((1, c.block_size, c.token_each), c.mask_id, dtype=torch.int64, device=device)
        return MLMImage(int(row[0]), tokens, scales, noise_scales, floors, s["top_k"], s["top_p"], generator)

    def release(self, image) -> None:
        pass   # an image holds no shared buffer

    @torch.no_grad()
    def step(self, images: list) -> list:
        """One refinement step of every image given; returns those finished. Every group's pass
        runs before any image changes, so a step that raises leaves them as they were."""
        if len(images) != len({id(im) for im in images}) or any(im.done for im in images):
            raise SamplingError("step() takes each image in flight once, none done")
        model, c = self.model, self.model.config
        device = model.device
        groups: dict = {}
        for i, im in enumerate(images):
            groups.setdefault((im.use_cfg, im.top_k, im.top_p), []).append(i)
        results = [None] * len(images)
        for (use_cfg, top_k, top_p), index in groups.items():
            members = [images[i] for i in index]
            labels = torch.tensor([im.label for im in members], dtype=torch.int64, device=device)
            rows = torch.cat([labels, torch.full_like(labels, c.num_classes)]) if use_cfg else labels
            scale = torch.stack([im.scales[im.k] for im in members]) if use_cfg else None
            draws, confidence = [], []
            for im in members:
                draw, g = model._generator_noise(im.generator, 1)
                draws.append(draw.view(1, c.block_size * c.token_each, c.vocab_size))
                confidence.append(g * im.noise_scales[im.k])
            floors = torch.stack([im.floors[im.k] for im in members]).view(-1, 1)
            sampled, tokens, logits = model.refine_step(
                torch.cat([im.tokens for im in members]), rows, scale, torch.cat(draws), torch.cat(confidence),
                floors, None, False, top_k, top_p)
            finite = torch.isfinite(logits).flatten(1).all(dim=1)
            for j, i in enumerate(index):
                results[i] = (tokens[j:j + 1], sampled[j:j + 1], finite[j])
        for im, (tokens, sampled, finite) in zip(images, results):
            im.tokens, im.sampled = tokens, sampled
            im.ok = finite if im.ok is None else im.ok & finite
            im.k += 1
        return [im for im in images if im.done]

    def tokens(self, images: list) -> torch.Tensor:
        check_draws(images)
        return torch.cat([im.sampled for im in images])

    def preview(self, images: list) -> torch.Tensor:
        """The tokens unmasked so far; masked positions hold token 0."""
        mask_id = self.model.config.mask_id
        tokens = torch.cat([im.tokens for im in images])
        return tokens.masked_fill(tokens == mask_id, 0)
