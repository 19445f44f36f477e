"""ELM's discrete AR family ("elm-ar"): Pepper-lll/LMforImageGeneration `llama/ar_model.py`
`Transformer` with its `generate_cfg`, reproduced exactly, on a static KV cache.

The published `generate_cfg` recomputes the whole prefix for `[cond; null]` at every one of its
steps (the file has a KVCache class that sampling never uses), so its cost grows with the
square of the sequence. Here: one prefill of the class position (+ a given prefix), then one
decode step per token against a static KV cache (engine/models/kv_cache.py), each step the
transformer on two rows (CFG doubles the batch) and the categorical draw on the device
(engine/ops/categorical.py). Same tokens after `torch.manual_seed(s)`.

Published behaviour reproduced (quirks included):
  * CFG always doubles the batch with the null class `num_classes` (also at cfg_scale 1: the
    logits are then `u + (c - u) * 1`, not exactly c). Logits: `u + (c - u) * cfg`, then
    `/ temperature`, then top-k by threshold (values tied with the k-th are kept), softmax,
    then one `torch.multinomial(probs[:, i], 1)` per sub-token, in sub-token order: reproduced
    as the exponential race multinomial computes (same RNG draws, no host sync).
  * Schedules, ratio = (step + 1) / num_iter, computed in float64 as published: linear
    1 + (s-1) r; constant s; cos 1 + (s-1) cos(-pi/2 + r pi/2); log
    1 + (s-1) log1p(r (e-1)) / log1p(e-1); square 1 + (s-1) r^2; square_root uses
    step / num_iter: 1 + (s-1) sqrt(step / num_iter) (so its first step is unguided).
    An unknown schedule: the published code fails (its `cfg` is unbound); here SamplingError.
  * `remask` and `scale_pow` are accepted and unused (as published).
  * Returns (indices [B, P + num_iter, token_each] including a given prefix, the last step's
    logits [B, token_each, V] after temperature and top-k, -inf where filtered).
  * `P + num_iter` may reach cls_token_num + block_size (the published RoPE table's length;
    one more token than the grid holds with cls_token_num = 1): the last sampled token is never
    fed back.
"""
from __future__ import annotations

import dataclasses
import math
import threading
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from ..ops.categorical import check_top_k, check_top_p, exponential_noise, sample_logits
from ..core.config import MAX_CLASSES, MAX_DEPTH, MAX_HEADS, MAX_PARAMS, MAX_SEQ_LEN, MAX_WIDTH, ConfigMixin
from ..core.config import check_int_range as _check_range
from ..core.errors import ConfigError, SamplingError
from ..core.protocol import SettingError, check_image_generator, resolve_settings
from ..core.plan import FLOAT32_MAX, MAX_BATCH, check_count, per_image
from ..core.loop import run_steps
from ..core.rng import check_generator
from .record import Family
from .discrete import BAETokens
from .mar import depth_of, shape_of
from .slots import SlotPool, StepImage

FAMILY_NAME = "elm-ar"
# fast= modes (engine.core.fast): speculative Jacobi decoding (the distribution is kept).
FAST_MODES = ("speculative",)
# The published GPT_models presets (llama/ar_model.py): layers, heads, width.
PRESETS: dict[str, dict] = {
    name: dict(n_layer=layers, n_head=heads, dim=dim)
    for name, (layers, heads, dim) in {
        "GPT-B": (12, 12, 768), "GPT-L": (24, 16, 1024), "GPT-XL": (36, 20, 1280),
        "GPT-XXL": (48, 24, 1536), "GPT-XXXL": (48, 40, 2560), "GPT-2B": (48, 28, 1792)}.items()
}
# ModelArgs fields that only matter for training (dropouts, init) or that the published model
# overrides or never reads (vocab_size is replaced by 2 ** code_dim): accepted and ignored.
TRAINING_ONLY = frozenset({"initializer_range", "token_dropout_p", "attn_dropout_p", "resid_dropout_p",
                           "ffn_dropout_p", "drop_path_rate", "max_batch_size", "max_seq_len",
                           "caption_dim", "vocab_size", "split_embder", "model_type"})
CFG_SCHEDULES = ("linear", "constant", "cos", "log", "square", "square_root")
MAX_TOKEN_EACH = 64
MAX_CODE_DIM = 24
MAX_CLS_TOKENS = 1024


class LlamaSizes:
    """Derived sizes and size checks of a LlamaGen-style transformer configuration (ELM's AR and
    masked models, CTF's stages): fields dim, n_head, n_kv_head, multiple_of, ffn_dim_multiplier,
    ffn_hidden_dim, norm_eps, rope_base."""

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def hidden_dim(self) -> int:
        """The SwiGLU width: `ffn_hidden_dim` when the weights told it, else LlamaGen's formula."""
        if self.ffn_hidden_dim is not None:
            return self.ffn_hidden_dim
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return hidden if hidden % self.multiple_of == 0 else hidden + self.multiple_of - hidden % self.multiple_of

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def check_llama_sizes(self) -> None:
        """The checks every such configuration needs (ranges of the fields, head split, 2D RoPE)."""
        for name, (low, high) in {"dim": (1, MAX_WIDTH), "n_layer": (0, MAX_DEPTH), "n_head": (1, MAX_HEADS),
                                  "multiple_of": (1, MAX_WIDTH)}.items():
            _check_range(name, getattr(self, name), low, high)
        if self.n_kv_head is not None:
            _check_range("n_kv_head", self.n_kv_head, 1, self.n_head)
            if self.n_head % self.n_kv_head:
                raise ConfigError(f"n_head {self.n_head} is not a multiple of n_kv_head {self.n_kv_head}")
        if self.ffn_hidden_dim is not None:
            _check_range("ffn_hidden_dim", self.ffn_hidden_dim, 1, 8 * MAX_WIDTH)
        if self.dim % self.n_head:
            raise ConfigError(f"dim {self.dim} is not divisible by n_head {self.n_head}")
        if self.head_dim % 4:
            raise ConfigError(f"head dimension dim / n_head = {self.head_dim} must be a multiple of 4 "
                              "(the 2D RoPE splits it into row and column halves of pairs)")
        if not 0 < self.norm_eps < 1:
            raise ConfigError(f"config field norm_eps must be in (0, 1), got {self.norm_eps}")
        if not 0 < self.rope_base <= 1e12:
            raise ConfigError(f"config field rope_base must be in (0, 1e12], got {self.rope_base}")
        if self.ffn_dim_multiplier is not None and not 0 < self.ffn_dim_multiplier <= 64:
            raise ConfigError(f"config field ffn_dim_multiplier must be in (0, 64], got {self.ffn_dim_multiplier}")
        if self.hidden_dim < 1:
            raise ConfigError(f"the feed-forward width is {self.hidden_dim}; check ffn_dim_multiplier")


class ClassGrid:
    """A class-conditional model over a square grid (fields block_size, num_classes,
    class_dropout_prob): its grid and class-embedding rows (the null class for CFG last)."""

    @property
    def grid(self) -> int:
        return math.isqrt(self.block_size)

    @property
    def has_null_class(self) -> bool:
        return self.class_dropout_prob > 0

    @property
    def class_rows(self) -> int:
        return self.num_classes + (1 if self.has_null_class else 0)

    def check_grid(self) -> None:
        if math.isqrt(self.block_size) ** 2 != self.block_size:
            raise ConfigError(f"block_size {self.block_size} must be a square (grid x grid tokens)")
        if not 0 <= self.class_dropout_prob <= 1:
            raise ConfigError(f"config field class_dropout_prob must be in [0, 1], got {self.class_dropout_prob}")


@dataclass
class ELMConfig(LlamaSizes, ClassGrid, ConfigMixin):
    """ELM's `ModelArgs` (same names and defaults) for the parts the sampler reads, plus one
    engine field. Unsupported published options are fields too, so that a value the engine does
    not implement is refused by name instead of silently ignored."""
    use_adaLN: bool = False
    attn_type: str = "sdp"
    pause: bool = False
    pause_num: int = 0
    token_each: int = 4
    cls_row: bool = False
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
    # Engine addition: the SwiGLU hidden width when it is known from the weights (a bare state
    # dict records neither multiple_of nor ffn_dim_multiplier); None: the published formula.
    ffn_hidden_dim: int | None = field(default=None)

    def __post_init__(self):
        self._coerce_and_validate()

    # Derived sizes (also LlamaSizes, ClassGrid) -------------------------------------------
    @property
    def vocab_size(self) -> int:
        return 2 ** self.code_dim

    @property
    def max_positions(self) -> int:
        """Sequence positions a call can use (class position included): the RoPE table length."""
        return self.cls_token_num + self.block_size

    def describe(self) -> str:
        return (f"dim={self.dim}, n_layer={self.n_layer}, n_head={self.n_head}, n_kv_head={self.n_kv_head}, "
                f"token_each={self.token_each}, code_dim={self.code_dim}, num_classes={self.num_classes}, "
                f"block_size={self.block_size}, ffn hidden={self.hidden_dim}")

    def validate(self) -> None:
        unsupported = {"use_adaLN": False, "attn_type": "sdp", "pause": False, "cls_row": False,
                       "pos_type": "rope2d"}
        for name, supported in unsupported.items():
            if getattr(self, name) != supported:
                raise ConfigError(f"config field {name}={getattr(self, name)!r} is not supported: the "
                                  f"engine implements ELM's released configuration ({name}={supported!r}; "
                                  "the published rope1d path does not run)")
        ranges = {"token_each": (1, MAX_TOKEN_EACH), "code_dim": (1, MAX_CODE_DIM),
                  "num_classes": (1, MAX_CLASSES), "cls_token_num": (1, MAX_CLS_TOKENS),
                  "block_size": (1, MAX_SEQ_LEN), "pause_num": (0, MAX_SEQ_LEN)}
        for name, (low, high) in ranges.items():
            _check_range(name, getattr(self, name), low, high)
        self.check_llama_sizes()
        self.check_grid()
        if self.estimate_params() > MAX_PARAMS:
            raise ConfigError(f"this configuration ({self.describe()}) has {self.estimate_params():,} "
                              f"parameters, over the engine's limit MAX_PARAMS = {MAX_PARAMS:,}")

    def estimate_params(self) -> int:
        """Parameters of engine.models.elm.ELMTransformer(config), from the sizes alone (exact)."""
        d, t, v = self.dim, self.token_each, self.vocab_size
        attn = d * (self.n_head + 2 * self.kv_heads) * self.head_dim + d * d
        layer = attn + 3 * d * self.hidden_dim + 2 * d
        embed = t * v * d + (t * d * d if t > 1 else 0)
        return self.class_rows * d + embed + self.n_layer * layer + d + t * d * v


ELMConfig.PRESETS = PRESETS
ELMConfig.IGNORED = TRAINING_ONLY


def infer_sizes(state: dict) -> dict:
    """The ModelArgs fields a bare ELM state dict determines. Not among them: block_size (RoPE
    has no stored table; default 256 = 16 x 16), n_head (taken from the preset whose width and
    depth the weights have, else it must be passed), and num_classes vs class_dropout_prob (the
    table has num_classes + 1 rows when class_dropout_prob > 0, ModelArgs' default)."""
    out: dict = {}
    shape = lambda key: shape_of(state, key)  # noqa: E731
    table = shape("cls_embedding.embedding_table.weight")
    if table:
        out["num_classes"], out["dim"] = table[0] - 1, table[1]
    if shape("tok_embedder.weight"):
        out["token_each"], vocab = 1, shape("tok_embedder.weight")[0]
    else:
        out["token_each"] = depth_of(state, "tok_embedder")
        vocab = (shape("tok_embedder.0.weight") or (0,))[0]
    if vocab and vocab & (vocab - 1) == 0:
        out["code_dim"] = vocab.bit_length() - 1
    out["n_layer"] = depth_of(state, "layers")
    w1 = shape("layers.0.feed_forward.w1.weight")
    if w1:
        out["ffn_hidden_dim"] = w1[0]
    for preset in PRESETS.values():
        if preset["dim"] == out.get("dim") and preset["n_layer"] == out["n_layer"]:
            out["n_head"] = preset["n_head"]
    wqkv = shape("layers.0.attention.wqkv.weight")
    if wqkv and "n_head" in out and wqkv[0] != 3 * out["dim"]:
        head_dim = out["dim"] // out["n_head"]
        out["n_kv_head"] = (wqkv[0] - out["dim"]) // (2 * head_dim)
    return out


def cfg_at(schedule: str, cfg_scale, step: int, num_iter: int):
    """The published per-step guidance scale (a Python / numpy float64 number)."""
    ratio = 1.0 * (step + 1) / num_iter
    if schedule == "linear":
        return 1.0 + (cfg_scale - 1.0) * ratio
    if schedule == "constant":
        return cfg_scale
    if schedule == "cos":
        return 1.0 + (cfg_scale - 1.0) * np.cos(-np.pi / 2 + ratio * (np.pi / 2))
    if schedule == "log":
        return 1.0 + (cfg_scale - 1.0) * np.log1p(ratio * (np.e - 1.0)) / np.log1p(np.e - 1.0)
    if schedule == "square":
        return 1.0 + (cfg_scale - 1) * ratio ** 2
    if schedule == "square_root":
        return 1.0 + (cfg_scale - 1.0) * ((1.0 * step / num_iter) ** 0.5)
    raise SamplingError(f"unknown cfg_schedule {schedule!r}; expected one of {CFG_SCHEDULES}")


def _check_schedule(schedule) -> str:
    if schedule not in CFG_SCHEDULES:
        raise SamplingError(f"unknown cfg_schedule {schedule!r}; expected one of {CFG_SCHEDULES}")
    return schedule


def _check_number(name: str, value, positive: bool = False) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(value) or abs(value) > FLOAT32_MAX or (positive and value <= 0):
        what = "a finite number > 0" if positive else "a finite number"
        raise SamplingError(f"{name} must be {what} (within float32 range), got {value!r}")
    return value


class ELMModel(BAETokens):
    """A loaded ELM AR model. `generate_cfg` has the published signature and results;
    `sample_tokens` is the engine's idiom (per-image settings and generators, top-p)."""

    family = FAMILY_NAME
    fast_modes = FAST_MODES
    DEFAULTS = {"num_iter": None, "cfg": 1.0, "cfg_schedule": "constant", "temperature": 1.0, "top_k": None,
                "top_p": None, "fast": "exact"}

    def __init__(self, module, backend="auto", cuda_graphs: bool = True, precision: str = "fp32"):
        """backend: where the categorical draw runs (the transformer is PyTorch either way):
        "reference" the torch statement (engine/ops/categorical.py), "triton" the fused kernel
        (engine/kernels/categorical_sample.py: CUDA, or CPU in Triton's interpreter), "auto"
        the kernel on CUDA when Triton can run it, else the torch statement. Chosen at run time
        for the model's device; "triton" where it cannot run warns and uses the torch path.
        cuda_graphs: on CUDA, each decode step is captured once and replayed per position."""
        if backend not in ("auto", "reference", "triton"):
            raise ConfigError(f"ELM models: backend must be 'auto' or 'reference' (PyTorch sampling), or 'triton' "
                              f"(the fused sampling kernel; the diffusion-head backends do not apply), got {backend!r}")
        if precision != "fp32":
            raise ConfigError(f"ELM models run in float32 (precision='fp32'), got precision={precision!r}")
        self.mar = self.module = module.eval().requires_grad_(False)
        self.config = module.config
        self._backend_request, self.precision, self.cuda_graphs = backend, precision, cuda_graphs
        self.sampling_defaults: dict = {}
        self._cache = None
        self._graph_cache: dict = {}
        self._lock = threading.Lock()
        self._fused_on = None          # the device the sampling path below was chosen for
        self._resolve_sampler()

    @property
    def device(self) -> torch.device:
        return self.module.device

    def to(self, device) -> "ELMModel":
        self.module.to(device)
        self._cache, self._graph_cache = None, {}
        self._resolve_sampler()
        return self

    @property
    def backend_name(self) -> str:
        return "triton" if self.fused_sampling else "reference"

    def _resolve_sampler(self) -> None:
        """Choose the sampling path for the current device (cheap when it has not changed)."""
        device = self.device
        if self._fused_on == device:
            return
        request = self._backend_request
        fused = request == "triton" or (request == "auto" and device.type == "cuda")
        if fused:   # (on CPU "auto" never imports triton: the interpreter is a test tool)
            from ..backends.categorical import fused_unavailable_reason

            why = fused_unavailable_reason(device)
            fused = why is None
            if why is not None and request == "triton":
                warnings.warn(f"engine: ELM backend 'triton' cannot run on {device} ({why}); sampling with "
                              "the PyTorch statement instead", RuntimeWarning, stacklevel=3)
        self.fused_sampling, self._fused_on = fused, device

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def __repr__(self) -> str:
        return f"ELMModel({self.config.describe()}, device={self.device})"

    # The published sampler ------------------------------------------------------------------
    @torch.no_grad()
    def generate_cfg(self, idx, cond, num_iter, temperature=1.0, top_k=None, remask=False, cfg_scale=10.0,
                     cfg_schedule="constant", scale_pow=1.0):
        """ELM's `Transformer.generate_cfg`, same arguments, same return value (indices
        [B, P + num_iter, token_each], last logits [B, token_each, V]) and, after
        torch.manual_seed(s), the same tokens: it draws torch's global RNG exactly as the
        published multinomial calls do. `remask` and `scale_pow` are unused, as published."""
        if cond is None:
            raise SamplingError("generate_cfg needs cond (class labels [B]; the published code fails "
                                "without them); for unconditional samples use sample_tokens(labels=None)")
        labels = self._labels(cond, None, allow_null=True)
        bsz = labels.shape[0]
        prefix = self._prefix(idx, bsz)
        num_iter = self._num_iter(num_iter, prefix)
        temperature = _check_number("temperature", temperature, positive=True)
        top_k = check_top_k(top_k)
        cfg_scale = _check_number("cfg_scale", cfg_scale)
        _check_schedule(cfg_schedule)
        self._need_null()
        scales = [cfg_at(cfg_schedule, cfg_scale, s, num_iter) for s in range(num_iter)]
        self._check_scales(scales)
        table = torch.tensor([float(s) for s in scales], dtype=torch.float32, device=self.device)
        tokens, logits = self._run(labels, prefix, num_iter, table, temperature, top_k, None, None,
                                   want_logits=True)
        return tokens, logits

    # The engine's sampler -----------------------------------------------------------------
    @torch.no_grad()
    def sample_tokens(self, bsz: int, labels=None, num_iter: int | None = None, cfg=1.0,
                      cfg_schedule="constant", temperature=1.0, top_k=None, top_p=None,
                      generator=None, progress: bool = False, fast="exact") -> torch.Tensor:
        """Sub-token indices [bsz, num_iter, token_each] (num_iter defaults to block_size: one
        image). labels: one class per image, or None for unconditional samples (the null class).
        `cfg`, `cfg_schedule` and `temperature` take one value or one per image; top_k / top_p
        are shared. Random numbers: generator None draws torch's global RNG as generate_cfg
        (same tokens for the same settings, with CFG); one torch.Generator drives the batch; a
        list gives image i its own, drawn as a batch of one would draw them. When no image
        uses CFG (every cfg 1) the null half is not run (ELM always runs it). `fast`: "exact"
        or "speculative" (speculative Jacobi decoding: the same distribution, other tokens;
        docs/fast.md)."""
        c = self.config
        bsz = check_count("bsz", bsz, MAX_BATCH)
        fast = self.check_fast(fast)
        labels = self._labels(labels, bsz, allow_null=False)
        num_iter = self._num_iter(c.block_size if num_iter is None else num_iter, None)
        cfgs = per_image("cfg", cfg, bsz, lambda v: _check_number("cfg", v))
        schedules = per_image("cfg_schedule", cfg_schedule, bsz, _check_schedule)
        temperatures = per_image("temperature", temperature, bsz,
                                 lambda v: _check_number("temperature", v, positive=True))
        top_k, top_p = check_top_k(top_k), check_top_p(top_p)
        generator = check_generator(generator, bsz)
        table = None
        if any(v != 1.0 for v in cfgs):
            self._need_null()
            per_step = [[cfg_at(sch, v, s, num_iter) for v, sch in zip(cfgs, schedules)] for s in range(num_iter)]
            self._check_scales([x for row in per_step for x in row])
            if all(row.count(row[0]) == len(row) for row in per_step):
                per_step = [row[0] for row in per_step]
            table = torch.tensor(np.asarray(per_step, dtype=np.float64), dtype=torch.float32, device=self.device)
        if len(set(temperatures)) == 1:
            temperature = float(temperatures[0])
        else:
            temperature = torch.tensor(temperatures, dtype=torch.float32, device=self.device)
        if fast.speculative is not None:
            return self._speculative(labels, num_iter, table, temperature, top_k, top_p, generator,
                                     fast.speculative.window, progress)
        tokens, _ = self._run(labels, None, num_iter, table, temperature, top_k, top_p, generator, progress)
        return tokens

    def _speculative(self, labels, num_iter, table, temperature, top_k, top_p, generator, window, progress):
        """fast="speculative": engine/families/speculative.py over this model's KV cache."""
        from .speculative import speculative_sample

        rows = labels if table is None else torch.cat([labels, torch.full_like(labels, self.config.num_classes)])
        with self._lock:
            cache = self.cache_for(rows.shape[0])
            tokens, self.last_passes = speculative_sample(self.module, rows, labels.shape[0], num_iter, table,
                                                          temperature, top_k, top_p, generator, window, cache,
                                                          progress)
        return tokens

    # The KV-cached loop ---------------------------------------------------------------------
    def cache_for(self, batch: int):
        """The static KV cache of this batch (doubled rows with CFG): allocated once, reused."""
        cache = self._cache
        if cache is None or cache.key[0] != batch or cache.k.device != self.device:
            self._cache, self._graph_cache = None, {}   # free the old buffers (and graphs on them)
            cache = self._cache = self.module.new_cache(batch)
        return cache

    def decode_step(self, prev, input_pos, cache, scale, temperature, top_k, top_p, noise, want_logits=True):
        """One graph-safe step: feed the tokens sampled last step (`prev` [B, T], doubled for CFG
        when `scale` is given) at position `input_pos`, sample the next ones. Fixed shapes, no
        host synchronisation: what torch.compile(fullgraph=True) traces and a CUDA graph
        captures. Returns (indices [B, T], filtered logits [B, T, V] (None when the kernel runs
        without want_logits), ok: a bool tensor, False when the probabilities were not finite)."""
        tokens = torch.cat([prev, prev]) if scale is not None else prev
        logits = self.module.decode(tokens, input_pos, cache)
        return self.sample_step(logits, noise, scale, temperature, top_k, top_p, want_logits)

    def sample_step(self, logits, noise, scale, temperature, top_k, top_p, want_logits=True):
        """The categorical draw of one step on the chosen path (see __init__'s backend)."""
        if self.fused_sampling:
            from ..backends.categorical import sample_logits_fused
            idx, filtered, ok = sample_logits_fused(logits, noise, scale, temperature, top_k, top_p, want_logits)
            return idx, (filtered if want_logits else None), ok.all()
        idx, filtered, probs = sample_logits(logits, noise, scale, temperature, top_k, top_p)
        return idx, filtered, torch.isfinite(probs).all()

    def decode_runner(self, cache, bsz, scale, temperature, top_k, top_p, want_logits):
        """CUDA graphs for the decode steps on CUDA with cuda_graphs on (engine/core/runners.py:
        captured once per shapes and settings, replayed for every position); None: eager."""
        if self.device.type == "cuda" and self.cuda_graphs:
            from ..core.runners import decode_graph_runner
            return decode_graph_runner(self, cache, bsz, scale, temperature, top_k, top_p, want_logits)
        return None

    def _run(self, labels, prefix, num_iter, table, temperature, top_k, top_p, generator, progress=False,
             want_logits=False):
        c, device = self.config, self.device
        bsz = labels.shape[0]
        use_cfg = table is not None
        rows = torch.cat([labels, torch.full_like(labels, c.num_classes)]) if use_cfg else labels
        prefix_in = None if prefix is None else (torch.cat([prefix, prefix]) if use_cfg else prefix)
        start = 0 if prefix is None else prefix.shape[1]
        out = []
        with self._lock:
            self._resolve_sampler()
            cache = self.cache_for(rows.shape[0])
            if self.fused_sampling and not isinstance(temperature, torch.Tensor):   # the kernel reads tensors
                temperature = torch.full((), float(temperature), dtype=torch.float32, device=device)
            runner = None if num_iter == 1 else self.decode_runner(
                cache, bsz, table[1] if use_cfg else None, temperature, top_k, top_p, want_logits)
            if runner is not None:
                runner.start(temperature)
            logits = self.module.prefill(rows, prefix_in, cache)
            input_pos = torch.tensor([start], device=device)
            state = {"ok": torch.ones((), dtype=torch.bool, device=device), "filtered": None}

            def step(s: int) -> None:
                noise = exponential_noise(bsz, c.token_each, c.vocab_size, generator, device)
                scale = table[s] if use_cfg else None
                last = want_logits and s == num_iter - 1
                if s == 0:
                    nxt, filtered, step_ok = self.sample_step(logits, noise, scale, temperature, top_k, top_p, last)
                else:
                    input_pos.add_(1)
                    if runner is not None:
                        nxt, filtered, step_ok = runner.run(out[-1], input_pos, scale, noise)
                        nxt = nxt.clone()   # the graph's output buffer is rewritten next step
                    else:
                        nxt, filtered, step_ok = self.decode_step(out[-1], input_pos, cache, scale, temperature,
                                                                  top_k, top_p, noise, last)
                state["ok"] = state["ok"] & step_ok
                state["filtered"] = filtered
                out.append(nxt)

            run_steps(num_iter, step, progress, unit="token")
            ok, filtered = state["ok"], state["filtered"]
            if runner is not None and want_logits:
                filtered = filtered.clone()
        if not bool(ok):   # one host sync per call, after the last step
            raise SamplingError("sampling produced NaN/Inf probabilities: the logits overflow float32 with "
                                "these weights and settings (temperature, cfg)")
        tokens = torch.stack(out, dim=1)
        if prefix is not None:
            tokens = torch.cat([prefix, tokens], dim=1)
        return tokens, filtered

    # The family protocol (engine/core/protocol.py) ------------------------------------------------
    def resolve_settings(self, **given) -> dict:
        """generate's settings: an image is block_size tokens, so num_iter is None or block_size."""
        c = self.config

        def image_length(value):
            if value is not None and (isinstance(value, bool) or value != c.block_size):
                raise SamplingError(f"an image is block_size = {c.block_size} tokens; num_iter must be "
                                    f"{c.block_size} (or None), got {value!r}")
            return c.block_size

        checks = {"num_iter": image_length, "cfg": lambda v: _check_number("cfg", v),
                  "cfg_schedule": _check_schedule, "temperature": lambda v: _check_number("temperature", v, True),
                  "top_k": check_top_k, "top_p": check_top_p, "fast": self.fast_setting}
        return resolve_settings(given, self.DEFAULTS, checks, self.sampling_defaults)

    def batcher(self, max_images: int = 32) -> "ELMBatcher":
        return ELMBatcher(self, self.module, self.module.new_cache, self.config.token_each,
                          self.config.vocab_size, max_images)

    # Validation --------------------------------------------------------------------------------
    def _need_null(self) -> None:
        if not self.config.has_null_class:
            raise SamplingError("this model has no CFG null class (class_dropout_prob = 0): ELM's "
                                "generate_cfg cannot run it; use sample_tokens with cfg=1")

    def _check_scales(self, scales) -> None:
        bad = [s for s in scales if not math.isfinite(s) or abs(s) > FLOAT32_MAX]
        if bad:
            raise SamplingError(f"the cfg schedule gives a scale {bad[0]!r} outside float32 range")

    def _labels(self, labels, bsz, allow_null: bool) -> torch.Tensor:
        """Class labels [B] int64 on the device; None: the null class (unconditional)."""
        c = self.config
        if labels is None:
            self._need_null()
            return torch.full((bsz,), c.num_classes, dtype=torch.int64, device=self.device)
        if isinstance(labels, torch.Tensor):
            if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
                raise SamplingError(f"labels must be integers, got a {labels.dtype} tensor")
            values = labels.detach().to("cpu", torch.int64)
        else:
            arr = np.asarray(labels)
            if arr.dtype == object or not np.issubdtype(arr.dtype, np.integer):
                raise SamplingError(f"labels must be integers, got {labels!r:.80}")
            values = torch.from_numpy(arr.astype(np.int64))
        if values.ndim != 1 or (bsz is not None and values.shape[0] != bsz) or values.shape[0] == 0:
            want = f"{bsz} labels (one per image)" if bsz is not None else "class labels [B]"
            raise SamplingError(f"expected {want}, got shape {tuple(values.shape)}")
        check_count("batch size", values.shape[0], MAX_BATCH)
        high = c.class_rows if allow_null else c.num_classes
        bad = values[(values < 0) | (values >= high)]
        if bad.numel():
            raise SamplingError(f"label {int(bad[0])} is out of range: this model has {c.num_classes} classes "
                                f"(0..{c.num_classes - 1})")
        return values.to(self.device)

    def _prefix(self, idx, bsz: int):
        c = self.config
        if idx is None:
            return None
        if not isinstance(idx, torch.Tensor) or idx.is_floating_point() or idx.dtype == torch.bool:
            raise SamplingError("idx must be None or an integer tensor [B, P, token_each] of sub-token indices")
        if idx.ndim != 3 or idx.shape[0] != bsz or idx.shape[2] != c.token_each:
            raise SamplingError(f"idx must have shape [{bsz}, P, {c.token_each}] (batch, positions, "
                                f"token_each), got {list(idx.shape)}")
        values = idx.detach().to("cpu", torch.int64)
        if values.numel() and (int(values.min()) < 0 or int(values.max()) >= c.vocab_size):
            raise SamplingError(f"idx holds sub-token indices outside 0..{c.vocab_size - 1} (2 ** code_dim)")
        return values.to(self.device)

    def _num_iter(self, num_iter, prefix) -> int:
        c = self.config
        num_iter = check_count("num_iter", num_iter, MAX_SEQ_LEN)
        used = (0 if prefix is None else prefix.shape[1]) + num_iter
        if used > c.max_positions:
            raise SamplingError(f"prefix length + num_iter = {used} exceeds the {c.max_positions} positions "
                                f"the model has (cls_token_num + block_size = {c.cls_token_num} + {c.block_size})")
        return num_iter


# Drop-in use with an instance of the published Transformer ------------------------------------
def is_elm(published) -> bool:
    return all(hasattr(published, name) for name in ("cls_embedding", "tok_embedder", "layers", "config"))


def config_of(published) -> dict:
    """ModelArgs values of a published Transformer (its `config` dataclass) + the SwiGLU width."""
    args = published.config
    if dataclasses.is_dataclass(args):
        values = dataclasses.asdict(args)
    elif hasattr(args, "__dict__"):
        values = dict(vars(args))
    else:
        raise ConfigError("not a published ELM Transformer: its config is not a ModelArgs")
    if len(published.layers):
        values["ffn_hidden_dim"] = published.layers[0].feed_forward.w1.weight.shape[0]
    return values


def accelerate(published, backend="auto", num_sampling_steps=None, **config) -> ELMModel:
    """An engine model with the published Transformer's weights (and device; no diffusion head,
    so num_sampling_steps must be None); its
    generate_cfg gives the published tokens for the same seeds."""
    from .checkpoints import build_module

    if num_sampling_steps is not None:
        raise ConfigError("num_sampling_steps is for diffusion-head models; this model draws categorical tokens")
    values = {**config_of(published), **config}
    cfg = ELMConfig.from_dict(values)
    state = {k: v.detach() for k, v in published.state_dict().items() if ".kv_cache." not in k}
    device = next(iter(state.values())).device
    module = build_module(state, cfg, f"{type(published).__name__} instance", FAMILY).to(device)
    return ELMModel(module, backend=backend)


def patch_generate_cfg(published, engine_model) -> None:
    """ELM's models sample with generate_cfg: replaced by the engine's (same signature)."""
    published.generate_cfg = engine_model.generate_cfg


def _family() -> Family:
    from ..models.elm import ELMTransformer

    return Family(name=FAMILY_NAME, config_cls=ELMConfig, presets=PRESETS, module_cls=ELMTransformer,
                  model_cls=ELMModel, marker_keys=("cls_embedding.embedding_table.weight", "norm.weight"),
                  infer_sizes=infer_sizes, head_fields=("n_head",), ignored_args=TRAINING_ONLY,
                  default_ema=False,   # ELM's sample.py reads a bare state dict ('model' of a training dict)
                  recognises=lambda p: is_elm(p) and not hasattr(p, "mlm_layer"), from_published=accelerate,
                  patch=patch_generate_cfg)


FAMILY = _family()


# Continuous batching (engine.serving) ------------------------------------------------------------
class ARImage(StepImage):
    """One image in flight: its settings, generator, the tokens sampled so far (`k` of them) and
    its KV-cache rows (conditional, then null with CFG)."""

    def __init__(self, label: int, scales, temperature: float, top_k, top_p, generator, num_iter: int):
        self.label, self.scales, self.generator = label, scales, generator
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.num_iter, self.k, self.out, self.rows = num_iter, 0, [], []
        self.ok = None

    @property
    def shape_key(self) -> tuple:
        return ("prefill",) if self.k == 0 else ("decode",)


class ARBatcher:
    """Images of one causal discrete transformer (ELM's AR model; CTF's first stage) in flight at
    once: each owns rows of one static KV cache (engine/families/slots.py); a step prefills the
    new images' rows and decodes every other row at its own position, in one pass each, then
    draws each image's next token with its own generator, cfg scale and temperature. The draws
    are those of `sample_tokens` for a batch of one with a list of one generator (the same
    exponential noise, guidance `u + (c - u) * s`, temperature, top-k / top-p), so an image's
    tokens do not depend on what else is in flight."""

    def __init__(self, model, module, new_cache, token_each: int, vocab: int, max_images: int):
        self.model, self.module = model, module
        self.token_each, self.vocab = token_each, vocab
        self.pool = SlotPool(new_cache, initial_rows=min(2 * max_images, 64))

    def start(self, label: int, scales, temperature: float, top_k, top_p, generator, num_iter: int) -> ARImage:
        """An image of class row `label` (the null row for unconditional ones); `scales`: its
        float32 cfg scale per step, or None without CFG."""
        check_image_generator(generator)
        return ARImage(label, scales, temperature, top_k, top_p, generator, num_iter)

    def release(self, image) -> None:
        self.pool.release(image)

    @torch.no_grad()
    def logits(self, images: list) -> list:
        """Each image's next-token logits (conditional, null or None): [1, T, V] each. Prefills
        the images at k = 0 into new rows; decodes every row held (a row whose image is not in
        `images` rewrites its cache position with the same values). Raising, it releases the
        rows it claimed."""
        new = [im for im in images if im.k == 0]
        try:
            return self._logits(images, new)
        except BaseException:
            for im in new:
                self.pool.release(im)
            raise

    def _logits(self, images: list, new: list) -> list:
        pool, module, device = self.pool, self.module, self.model.device
        held = pool.used
        if held:
            by_row = [owner for owner, _ in pool.owner]
            prev = torch.cat([owner.out[-1] for owner in by_row])                     # [R, T]
            pos = torch.tensor([owner.k for owner in by_row], dtype=torch.int64, device=device)
            if held == 1:
                pos = pos[:1]
            decoded = module.decode(prev, pos, pool.cache.rows(0, held))
        null = self.model.config.num_classes
        labels = []
        for im in new:
            pool.claim(im, 2 if im.use_cfg else 1)
            labels += [im.label] + ([null] if im.use_cfg else [])
        if new:
            rows = torch.tensor(labels, dtype=torch.int64, device=device)
            prefilled = module.prefill(rows, None, pool.cache.rows(held, pool.used))
        out = []
        for im in images:
            picks = [decoded[r:r + 1] if r < held else prefilled[r - held:r - held + 1] for r in im.rows]
            out.append((picks[0], picks[1] if im.use_cfg else None))
        return out

    @torch.no_grad()
    def step(self, images: list) -> list:
        """One token for every image given (any subset of those in flight); returns those
        finished (released). Raising, it leaves every image and row as it was."""
        if len(images) != len({id(im) for im in images}) or any(im.done for im in images):
            raise SamplingError("step() takes each image in flight once, none done")
        logits = self.logits(images)
        try:
            drawn = draw(images, logits, self.token_each, self.vocab, self.model.device)
        except BaseException:
            for im in images:
                if im.k == 0:
                    self.pool.release(im)
            raise
        append_draws(images, drawn)
        finished = [im for im in images if im.done]
        for im in finished:
            self.pool.release(im)
        return finished

    def tokens(self, images: list) -> torch.Tensor:
        check_draws(images)
        return torch.cat([torch.stack(im.out, dim=1) for im in images])

    def preview(self, images: list) -> torch.Tensor:
        """The tokens drawn so far; the positions after them hold token 0."""
        out = []
        for im in images:
            blank = torch.zeros(1, im.num_iter, self.token_each, dtype=torch.int64, device=self.model.device)
            if im.out:
                blank[:, :len(im.out)] = torch.stack(im.out, dim=1)
            out.append(blank)
        return torch.cat(out)


def draw(images: list, logits: list, n_draws: int, vocab: int, device) -> list:
    """Each image's next tokens from its (conditional, null) logits: guidance, then the
    categorical draw, grouped by the settings a call shares (top-k, top-p). Returns (tokens
    [1, n_draws], finite) per image; `append_draws` applies them (nothing changes here)."""
    rows = []
    for im, (cond, uncond) in zip(images, logits):
        rows.append(cond if uncond is None else uncond + (cond - uncond) * im.scales[im.k])
    groups: dict = {}
    for i, im in enumerate(images):
        groups.setdefault((im.top_k, im.top_p), []).append(i)
    drawn = [None] * len(images)
    for (top_k, top_p), members in groups.items():
        noise = torch.cat([exponential_noise(1, n_draws, vocab, images[i].generator, device) for i in members])
        temps = torch.tensor([images[i].temperature for i in members], dtype=torch.float32, device=device)
        idx, _, probs = sample_logits(torch.cat([rows[i] for i in members]), noise, None, temps, top_k, top_p)
        finite = torch.isfinite(probs).flatten(1).all(dim=1)
        for j, i in enumerate(members):
            drawn[i] = (idx[j:j + 1], finite[j])
    return drawn


def append_draws(images: list, drawn: list) -> None:
    """Append each image's drawn tokens to `image.out` and advance `image.k`."""
    for im, (tokens, finite) in zip(images, drawn):
        im.out.append(tokens)
        im.ok = finite if im.ok is None else im.ok & finite
        im.k += 1


def refuse_speculative(model, settings) -> None:
    """A batcher's images advance one token per step in a shared pass: fast="speculative" (a
    window per image, verified and redrafted) cannot join it."""
    if not model.check_fast(settings.get("fast")).exact:
        raise SettingError("fast", f"{settings.get('fast')!r} cannot run in a shared batch (serving): "
                                   f"{model.family} images in flight advance one token per step; use fast='exact'")


def check_draws(images: list) -> None:
    """One host sync for finished images: non-finite probabilities are never returned silently."""
    if not all(bool(im.ok) for im in images if im.ok is not None):
        raise SamplingError("sampling produced NaN/Inf probabilities: the logits overflow float32 with "
                            "these weights and settings (temperature, cfg)")


class ELMBatcher(ARBatcher):
    """ARBatcher of ELM's AR model: `add` takes engine.generate's settings (resolve_settings)."""

    def add(self, label=None, texts=None, settings=None, generator=None) -> ARImage:
        model, s = self.model, settings
        refuse_speculative(model, s)
        row = model._labels(None if label is None else [label], 1, allow_null=False)
        num_iter, cfg = s["num_iter"], float(s["cfg"])
        scales = None
        if cfg != 1.0:
            model._need_null()
            per_step = [cfg_at(s["cfg_schedule"], cfg, k, num_iter) for k in range(num_iter)]
            model._check_scales(per_step)
            scales = torch.tensor(np.asarray(per_step, dtype=np.float64), dtype=torch.float32, device=model.device)
        return self.start(int(row[0]), scales, float(s["temperature"]), s["top_k"], s["top_p"], generator, num_iter)
