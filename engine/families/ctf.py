"""CTF, coarse-to-fine token prediction ("ctf"; arXiv 2503.16194, Guo, Zhang and Shieh: "Improving
autoregressive image generation through coarse-to-fine token prediction"). The paper's code is not
public: this is the engine's statement of its procedure (docs/ctf.md says which parts are the
paper's and which the engine's).

Sampling, `CTFModel.sample_tokens`: 256 + 1 steps for a 16 x 16 grid.
  stage 1  a causal AR transformer (ELM's, engine.models.elm, vocabulary = the cluster labels)
           samples the coarse label of every token: one prefill of the class position, then one
           fixed-shape KV-cached `decode_step` per token, CFG by doubling the batch with the null
           class (`u + (c - u) * s`, per-step scale from ELM's schedules), temperature, top-k /
           top-p, and the exponential-race draw (engine.ops.categorical).
  stage 2  a bidirectional transformer reads the class and all coarse labels and predicts every
           fine label (the codebook index, as ELM-style sub-tokens) in one pass, `refine`: CFG
           (cond / null class), temperature, top-k / top-p and the draw. By default (engine choice,
           `restrict=True`) the fine label of a token is drawn among the codes of its coarse
           cluster only, from the joint logits sum_i logit_i(sub-token i of the code), so the fine
           tokens always agree with stage 1; `restrict=False` draws each sub-token from its head.
Paper defaults: cfg 2.0 and temperature 1.1 in both stages, no top-k (in stage 2), 512 clusters.

Settings per stage: `cfg`, `temperature`, `top_k`, `top_p` take one value (both stages) or a
tuple (stage 1, stage 2); a list is one value per image (cfg, temperature), for both stages, and a
tuple may hold such lists: cfg=([2.0, 3.0], 1.5).
"""
from __future__ import annotations

import dataclasses
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from ..ops.categorical import check_top_k, check_top_p, exponential_noise, guide, sample_logits
from ..core.config import MAX_CLASSES, MAX_PARAMS, MAX_SEQ_LEN, ConfigMixin
from ..core.config import check_int_range as _check_range
from ..core.errors import CheckpointError, ConfigError, SamplingError
from ..core.plan import MAX_BATCH, check_count, per_image
from ..core.protocol import check_image_generator, resolve_settings
from ..core.loop import run_steps
from ..core.rng import check_generator
from .record import Family
from .discrete import BAETokens
from .elm import (CFG_SCHEDULES, ARBatcher, ARImage, ClassGrid, LlamaSizes, _check_number, _check_schedule,
                  append_draws, cfg_at, check_draws, draw, refuse_speculative)

FAMILY_NAME = "ctf"
# fast= modes (engine.core.fast): speculative Jacobi decoding of the first (coarse AR) stage.
FAST_MODES = ("speculative",)
CTF_FORMAT = "engine-ctf"
CTF_FORMAT_VERSION = 1
MAX_CODE_BITS = 24          # cluster_of has 2 ** (token_each * code_dim) entries: at most 16M
MAX_TOKEN_EACH = 64
# The paper's sampling settings (both stages), and the engine's choice of a constant schedule.
PAPER_SAMPLING = {"cfg": (2.0, 2.0), "temperature": (1.1, 1.1), "top_k": (None, None), "top_p": (None, None),
                  "cfg_schedule": "constant"}


# Configuration ---------------------------------------------------------------------------------
@dataclass
class CTFStageConfig(LlamaSizes, ConfigMixin):
    """One stage's transformer sizes (ELM / LlamaGen names and defaults: GPT-B)."""
    dim: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    ffn_hidden_dim: int | None = None     # the SwiGLU width; None: LlamaGen's formula
    rope_base: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self):
        self._coerce_and_validate()


    def layer_params(self) -> int:
        d = self.dim
        return d * (self.n_head + 2 * self.kv_heads) * self.head_dim + d * d + 3 * d * self.hidden_dim + 2 * d

    def validate(self) -> None:
        self.check_llama_sizes()


def parse_stage(name: str, value) -> CTFStageConfig:
    if isinstance(value, CTFStageConfig):
        return value
    if not isinstance(value, Mapping):
        raise ConfigError(f"config field {name} must be a dict of stage sizes (dim, n_layer, n_head, ...), "
                          f"got {type(value).__name__}")
    try:
        return CTFStageConfig.from_dict(dict(value))
    except ConfigError as err:
        raise ConfigError(f"{name}: {err}") from None


@dataclass
class CTFConfig(ClassGrid, ConfigMixin):
    """Both stages, the token layout and the cluster count. The codebook has
    V = 2 ** (token_each * code_dim) indices; a position's index is its token_each sub-tokens of
    code_dim bits, most significant first (ELM / BAE layout; token_each 1 for a VQ codebook)."""
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    block_size: int = 256
    token_each: int = 1
    code_dim: int = 14
    num_clusters: int = 512
    stage1: CTFStageConfig = field(default_factory=CTFStageConfig, metadata={"coerce": parse_stage})
    stage2: CTFStageConfig = field(default_factory=CTFStageConfig, metadata={"coerce": parse_stage})

    def __post_init__(self):
        self._coerce_and_validate()

    @property
    def codebook_size(self) -> int:
        return 2 ** (self.token_each * self.code_dim)

    @property
    def sub_vocab(self) -> int:
        return 2 ** self.code_dim

    def _shape(self, stage: CTFStageConfig, vocab: int, token_each: int):
        from ..models.ctf import StageShape

        return StageShape(dim=stage.dim, n_layer=stage.n_layer, n_head=stage.n_head, kv_heads=stage.kv_heads,
                          hidden_dim=stage.hidden_dim, norm_eps=stage.norm_eps, rope_base=stage.rope_base,
                          vocab_size=vocab, token_each=token_each, class_rows=self.class_rows,
                          block_size=self.block_size, num_clusters=self.num_clusters)

    def stage1_shape(self):
        return self._shape(self.stage1, self.num_clusters, 1)

    def stage2_shape(self):
        return self._shape(self.stage2, self.sub_vocab, self.token_each)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        s1, s2 = self.stage1, self.stage2
        return (f"stage1 {s1.n_layer}x{s1.dim} ({s1.n_head} heads), stage2 {s2.n_layer}x{s2.dim} ({s2.n_head} heads), "
                f"num_clusters={self.num_clusters}, token_each={self.token_each}, code_dim={self.code_dim}, "
                f"num_classes={self.num_classes}, block_size={self.block_size}")

    def estimate_params(self) -> int:
        """Parameters of engine.models.ctf.CTFModule(config) (exact; cluster_of not counted)."""
        k, rows = self.num_clusters, self.class_rows
        d1, d2 = self.stage1.dim, self.stage2.dim
        stage1 = rows * d1 + k * d1 + self.stage1.n_layer * self.stage1.layer_params() + d1 + d1 * k
        stage2 = (rows * d2 + k * d2 + self.stage2.n_layer * self.stage2.layer_params() + d2
                  + self.token_each * d2 * self.sub_vocab)
        return stage1 + stage2

    def validate(self) -> None:
        for name, (low, high) in {"num_classes": (1, MAX_CLASSES), "block_size": (1, MAX_SEQ_LEN),
                                  "token_each": (1, MAX_TOKEN_EACH), "code_dim": (1, MAX_CODE_BITS),
                                  "num_clusters": (1, 2 ** MAX_CODE_BITS)}.items():
            _check_range(name, getattr(self, name), low, high)
        if self.token_each * self.code_dim > MAX_CODE_BITS:
            raise ConfigError(f"token_each * code_dim = {self.token_each * self.code_dim} bits per position "
                              f"exceeds the engine's limit {MAX_CODE_BITS} (the cluster map has one entry per code)")
        if self.num_clusters > self.codebook_size:
            raise ConfigError(f"num_clusters {self.num_clusters} exceeds the codebook size "
                              f"2 ** (token_each * code_dim) = {self.codebook_size}")
        self.check_grid()
        if self.estimate_params() > MAX_PARAMS:
            raise ConfigError(f"this configuration ({self.describe()}) has {self.estimate_params():,} "
                              f"parameters, over the engine's limit MAX_PARAMS = {MAX_PARAMS:,}")


# The cluster map --------------------------------------------------------------------------------
def check_cluster_map(cluster_of, config: CTFConfig, source: str = "cluster map") -> None:
    """CheckpointError naming `cluster_of` unless it is an integer tensor [V] whose values lie in
    0..num_clusters-1 with every cluster non-empty."""
    c = config
    if not isinstance(cluster_of, torch.Tensor) or cluster_of.is_floating_point() or cluster_of.is_complex() \
            or cluster_of.dtype == torch.bool:
        what = cluster_of.dtype if isinstance(cluster_of, torch.Tensor) else type(cluster_of).__name__
        raise CheckpointError(f"{source}: cluster_of must be an integer tensor, got {what}")
    if tuple(cluster_of.shape) != (c.codebook_size,):
        raise CheckpointError(f"{source}: cluster_of has shape {list(cluster_of.shape)}, expected "
                              f"[{c.codebook_size}] (one coarse label per codebook index)")
    values = cluster_of.detach().to("cpu", torch.int64)
    low, high = int(values.min()), int(values.max())
    if low < 0 or high >= c.num_clusters:
        bad = low if low < 0 else high
        raise CheckpointError(f"{source}: cluster_of holds the label {bad}, outside 0..{c.num_clusters - 1} "
                              f"(num_clusters = {c.num_clusters})")
    empty = (torch.bincount(values, minlength=c.num_clusters) == 0).nonzero().flatten()
    if empty.numel():
        raise CheckpointError(f"{source}: cluster_of leaves {empty.numel()} of the {c.num_clusters} clusters "
                              f"empty (e.g. cluster {int(empty[0])}); every coarse label needs a code")


def check_ctf_state(state: dict, config: CTFConfig, source: str) -> None:
    check_cluster_map(state["cluster_of"], config, source)


def infer_sizes(state: dict) -> dict:
    raise CheckpointError("a CTF state dict (stage1.*, stage2.*, cluster_of) has no configuration of its own: "
                          f"CTF models load from engine directories (format {CTF_FORMAT!r}, written by "
                          "engine.families.ctf.save_ctf)")


# Settings -----------------------------------------------------------------------------------------
def per_stage(name: str, value, check=lambda name, v: v) -> tuple:
    """(stage 1, stage 2) of setting `name`, each entry `check(name, entry)` with the stage named
    in its errors ("cfg (stage 2)"): a tuple is the pair, anything else is shared by both."""
    if isinstance(value, tuple):
        if len(value) != 2:
            raise SamplingError(f"{name}: a per-stage setting is a tuple (stage 1, stage 2), got "
                                f"{len(value)} entries")
        return tuple(check(f"{name} (stage {i})", v) for i, v in enumerate(value, 1))
    checked = check(name, value)
    return checked, checked


def _per_image_numbers(name, value, bsz, positive=False) -> tuple:
    return per_image(name, value, bsz, lambda v: _check_number(name, v, positive=positive))


class CTFModel(BAETokens):
    """A loaded CTF model: both stages, the cluster map and the two-stage sampler."""

    family = FAMILY_NAME
    fast_modes = FAST_MODES

    def __init__(self, module, backend="auto", cuda_graphs: bool = True, precision: str = "fp32"):
        if backend not in ("auto", "reference"):
            raise ConfigError(f"CTF models run in PyTorch: backend must be 'auto' or 'reference', got {backend!r}")
        if precision != "fp32":
            raise ConfigError(f"CTF models run in float32 (precision='fp32'), got precision={precision!r}")
        self.module = module.eval().requires_grad_(False)
        self.config = module.config
        self.backend_name, self.precision, self.cuda_graphs = "reference", precision, cuda_graphs
        self.sampling_defaults: dict = {}
        self._cache = None
        self._lock = threading.Lock()
        self._bind()

    def _bind(self) -> None:
        """Per-cluster member tables (computed once from the weights)."""
        from ..models.ctf import member_tables

        self.members, self.member_valid = member_tables(self.module.cluster_of, self.config.num_clusters)

    @property
    def device(self) -> torch.device:
        return self.module.device

    @property
    def cluster_of(self) -> torch.Tensor:
        return self.module.cluster_of

    def to(self, device) -> "CTFModel":
        self.module.to(device)
        self._cache = None
        self._bind()
        return self

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def __repr__(self) -> str:
        return f"CTFModel({self.config.describe()}, device={self.device})"

    # The graph-safe steps -------------------------------------------------------------------------
    def decode_step(self, prev, input_pos, cache, scale, temperature, top_k, top_p, noise):
        """Stage 1, one token: feed the coarse labels sampled last step (`prev` [B, 1], doubled
        for CFG when `scale` is given) at position `input_pos` ([1] tensor), draw the next ones
        with `noise` [B, 1, K]. Fixed shapes, no host synchronisation."""
        tokens = torch.cat([prev, prev]) if scale is not None else prev
        logits = self.module.stage1.decode(tokens, input_pos, cache)
        return sample_logits(logits, noise, scale, temperature, top_k, top_p)

    def refine(self, coarse, rows, scale, temperature, top_k, top_p, noise, restrict: bool = True):
        """Stage 2, every token at once: coarse labels [B, L] and class rows [B'] ([cond; null]
        when `scale` is given) -> (fine sub-tokens [B, L, token_each], filtered logits, probs).
        restrict: draw among the codes of each token's cluster (noise [B, L, M]); else one draw
        per sub-token (noise [B, L * token_each, 2 ** code_dim]). No host synchronisation."""
        from ..models.ctf import codes_to_subtokens

        c = self.config
        coarse_in = torch.cat([coarse, coarse]) if scale is not None else coarse
        logits = self.module.stage2(coarse_in, rows)                       # [B', L, T, Vs]
        if scale is not None:
            logits = guide(logits, scale)
        bsz, length = coarse.shape
        if not restrict:
            idx, filtered, probs = sample_logits(logits.reshape(bsz, length * c.token_each, -1), noise, None,
                                                 temperature, top_k, top_p)
            return idx.view(bsz, length, c.token_each), filtered, probs
        members = self.members[coarse]                                      # [B, L, M]
        sub = codes_to_subtokens(members, c.token_each, c.code_dim)         # [B, L, M, T]
        joint = logits.gather(-1, sub.transpose(-1, -2)).sum(-2)            # [B, L, M]
        joint = joint.masked_fill(~self.member_valid[coarse], float("-inf"))
        idx, filtered, probs = sample_logits(joint, noise, None, temperature, top_k, top_p)
        codes = members.gather(-1, idx.unsqueeze(-1)).squeeze(-1)
        return codes_to_subtokens(codes, c.token_each, c.code_dim), filtered, probs

    # The sampler -----------------------------------------------------------------------------------
    @torch.no_grad()
    def sample_tokens(self, bsz: int, labels=None, cfg=PAPER_SAMPLING["cfg"], cfg_schedule="constant",
                      temperature=PAPER_SAMPLING["temperature"], top_k=None, top_p=None, restrict: bool = True,
                      generator=None, progress: bool = False, fast="exact") -> torch.Tensor:
        """Fine codes [bsz, block_size, token_each] (ELM's token layout: a BAE decodes them).
        `fast`: "exact" or "speculative" (stage 1 by speculative Jacobi decoding; docs/fast.md)."""
        return self.sample(bsz, labels, cfg, cfg_schedule, temperature, top_k, top_p, restrict, generator,
                           progress, fast)[1]

    @torch.no_grad()
    def sample(self, bsz: int, labels=None, cfg=PAPER_SAMPLING["cfg"], cfg_schedule="constant",
               temperature=PAPER_SAMPLING["temperature"], top_k=None, top_p=None, restrict: bool = True,
               generator=None, progress: bool = False, fast="exact") -> tuple[torch.Tensor, torch.Tensor]:
        """(coarse labels [B, L], fine codes [B, L, token_each]). labels: one class per image, or
        None (the null class: unconditional). cfg / temperature: one value, one per image, or a
        tuple (stage 1, stage 2) of those; top_k / top_p: one value or a tuple per stage.
        cfg_schedule (ELM's schedules) sets stage 1's per-step scale; stage 2 uses its cfg as is.
        generator: None (torch's global RNG), one torch.Generator, or one per image (image i then
        depends on generator i alone: its stage-1 noise, then its stage-2 noise)."""
        c = self.config
        bsz = check_count("bsz", bsz, MAX_BATCH)
        fast = self.check_fast(fast)
        labels = self._labels(labels, bsz)
        if not isinstance(restrict, bool):
            raise SamplingError(f"restrict must be True or False, got {restrict!r}")
        cfg1, cfg2 = per_stage("cfg", cfg, lambda n, v: _per_image_numbers(n, v, bsz))
        t1, t2 = per_stage("temperature", temperature, lambda n, v: _per_image_numbers(n, v, bsz, positive=True))
        k1, k2 = per_stage("top_k", top_k, lambda n, v: check_top_k(v, n))
        p1, p2 = per_stage("top_p", top_p, lambda n, v: check_top_p(v, n))
        schedules = per_image("cfg_schedule", cfg_schedule, bsz, _check_schedule)
        generator = check_generator(generator, bsz)
        length = c.block_size
        table = None
        if any(v != 1.0 for v in cfg1):
            self._need_null()
            per_step = [[cfg_at(s, v, step, length) for v, s in zip(cfg1, schedules)] for step in range(length)]
            table = torch.tensor(np.asarray(per_step, dtype=np.float64), dtype=torch.float32, device=self.device)
        scale2 = None
        if any(v != 1.0 for v in cfg2):
            self._need_null()
            scale2 = self._per_image_tensor(cfg2)
        with self._lock:
            coarse, ok = self._stage1(labels, table, self._per_image_tensor(t1), k1, p1, generator, progress, fast)
            rows = torch.cat([labels, torch.full_like(labels, c.num_classes)]) if scale2 is not None else labels
            noise = self._stage2_noise(bsz, restrict, generator)
            fine, _, probs = self.refine(coarse, rows, scale2, self._per_image_tensor(t2), k2, p2, noise, restrict)
            ok &= torch.isfinite(probs).all()
        if not bool(ok):   # one host sync per call, after both stages
            raise SamplingError("sampling produced NaN/Inf probabilities: the logits overflow float32 with "
                                "these weights and settings (temperature, cfg)")
        return coarse, fine

    def cache_for(self, batch: int):
        cache = self._cache
        if cache is None or cache.key[0] != batch or cache.k.device != self.device:
            self._cache = None
            cache = self._cache = self.module.stage1.new_cache(batch)
        return cache

    def _stage1(self, labels, table, temperature, top_k, top_p, generator, progress, fast=None):
        c, device = self.config, self.device
        bsz = labels.shape[0]
        use_cfg = table is not None
        rows = torch.cat([labels, torch.full_like(labels, c.num_classes)]) if use_cfg else labels
        cache = self.cache_for(rows.shape[0])
        if fast is not None and fast.speculative is not None:   # engine/families/speculative.py
            from .speculative import speculative_sample

            tokens, self.last_passes = speculative_sample(self.module.stage1, rows, bsz, c.block_size, table,
                                                          temperature, top_k, top_p, generator,
                                                          fast.speculative.window, cache, progress)
            return tokens[..., 0], torch.ones((), dtype=torch.bool, device=device)
        logits = self.module.stage1.prefill(rows, None, cache)
        input_pos = torch.zeros(1, dtype=torch.int64, device=device)
        state = {"ok": torch.ones((), dtype=torch.bool, device=device)}
        out = []

        def step(s: int) -> None:
            noise = exponential_noise(bsz, 1, c.num_clusters, generator, device)
            scale = table[s] if use_cfg else None
            if s == 0:
                nxt, _, probs = sample_logits(logits, noise, scale, temperature, top_k, top_p)
            else:
                input_pos.add_(1)
                nxt, _, probs = self.decode_step(out[-1], input_pos, cache, scale, temperature, top_k, top_p, noise)
            state["ok"] = state["ok"] & torch.isfinite(probs).all()
            out.append(nxt)

        run_steps(c.block_size, step, progress, desc="coarse labels", unit="token")
        ok = state["ok"]
        return torch.cat(out, dim=1), ok

    def _stage2_noise(self, bsz, restrict, generator):
        c = self.config
        length = c.block_size
        if restrict:
            width = self.members.shape[1]
            return exponential_noise(bsz, 1, length * width, generator, self.device).view(bsz, length, width)
        return exponential_noise(bsz, 1, length * c.token_each * c.sub_vocab, generator,
                                 self.device).view(bsz, length * c.token_each, c.sub_vocab)

    # The family protocol (engine/core/protocol.py) ------------------------------------------------
    def resolve_settings(self, **given) -> dict:
        """generate's settings: cfg, temperature, top_k, top_p one value or a pair (stage 1,
        stage 2); num_iter is None or block_size (stage 1 samples the whole grid)."""
        c = self.config

        def image_length(value):
            if value is not None and (isinstance(value, bool) or value != c.block_size):
                raise SamplingError(f"CTF samples block_size = {c.block_size} coarse labels then refines them in "
                                    f"one pass; num_iter must be {c.block_size} (or None), got {value!r}")
            return c.block_size

        def pair(name):
            def check(value):
                per_stage(name, value)
                return value
            return check

        defaults = {"num_iter": None, "cfg_schedule": "constant", **PAPER_SAMPLING, "fast": "exact"}
        checks = {"num_iter": image_length, "cfg": pair("cfg"), "temperature": pair("temperature"),
                  "top_k": pair("top_k"), "top_p": pair("top_p"), "cfg_schedule": _check_schedule,
                  "fast": self.fast_setting}
        settings = resolve_settings(given, defaults, checks, sampling_from_json(self.sampling_defaults))
        del settings["num_iter"]   # checked only: stage 1 always samples the whole grid
        return settings

    def batcher(self, max_images: int = 32) -> "CTFBatcher":
        return CTFBatcher(self, self.module.stage1, self.module.stage1.new_cache, 1, self.config.num_clusters,
                          max_images)

    def _per_image_tensor(self, values):
        """One shared value as a 0-d tensor, else [B] (float32, as ELM's scale tables)."""
        if len(set(values)) == 1:
            return torch.tensor(float(values[0]), dtype=torch.float32, device=self.device)
        return torch.tensor([float(v) for v in values], dtype=torch.float32, device=self.device)

    def _need_null(self) -> None:
        if not self.config.has_null_class:
            raise SamplingError("this model has no CFG null class (class_dropout_prob = 0): use cfg=1 "
                                "in both stages")

    def _labels(self, labels, bsz) -> torch.Tensor:
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
        if values.ndim != 1 or values.shape[0] != bsz:
            raise SamplingError(f"expected {bsz} labels (one per image), got shape {tuple(values.shape)}")
        bad = values[(values < 0) | (values >= c.num_classes)]
        if bad.numel():
            raise SamplingError(f"label {int(bad[0])} is out of range: this model has {c.num_classes} classes "
                                f"(0..{c.num_classes - 1})")
        return values.to(self.device)


# The engine directory -----------------------------------------------------------------------------
def _jsonable_sampling(sampling: dict) -> dict:
    """A per-stage pair as a two-entry list, or as one value when both stages share it (what
    engine.evaluate and the CLI read)."""
    return {k: (v[0] if v[0] == v[1] else list(v)) if isinstance(v, tuple) else v for k, v in sampling.items()}


def save_ctf(model: CTFModel, out_dir, sampling: dict | None = None, extra: dict | None = None,
             dtype: torch.dtype = torch.float32):
    """Write `model` as an engine directory: config.json ("format": "engine-ctf", both stage
    configs, the sampling defaults) + model.safetensors (stage1.*, stage2.*, cluster_of).
    dtype: storage precision of the weights (loading reads them as float32)."""
    from .checkpoints import check_state_dict, save_engine_dir

    state = model.state_dict()
    check_state_dict(state, model.config, "the model to save", FAMILY)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    sampling = {**PAPER_SAMPLING, **sampling_from_json(model.sampling_defaults), **(sampling or {}),
                "num_iter": model.config.block_size}   # 256 + 1 steps: num_iter counts stage 1's
    meta = {"format": CTF_FORMAT, "version": CTF_FORMAT_VERSION, "sampling": _jsonable_sampling(sampling),
            **(extra or {})}
    return save_engine_dir(state, model.config, out_dir, FAMILY, meta)


def sampling_from_json(sampling: dict) -> dict:
    """A directory's recorded settings: a two-entry list of a per-stage setting is the pair."""
    return {k: tuple(v) if k in ("cfg", "temperature", "top_k", "top_p") and isinstance(v, list) else v
            for k, v in sampling.items()}


def _family() -> Family:
    from ..models.ctf import CTFModule

    return Family(name=FAMILY_NAME, config_cls=CTFConfig, presets={}, module_cls=CTFModule, model_cls=CTFModel,
                  marker_keys=("cluster_of", "stage1.norm.weight", "stage2.norm.weight"), infer_sizes=infer_sizes,
                  head_fields=(), default_ema=False, check_state=check_ctf_state, formats=(CTF_FORMAT,))


FAMILY = _family()
__all__ = ["CTFConfig", "CTFStageConfig", "CTFModel", "save_ctf", "check_cluster_map", "PAPER_SAMPLING",
           "CFG_SCHEDULES", "FAMILY"]


# Continuous batching (engine.serving) ------------------------------------------------------------
class CTFImage(ARImage):
    """An image in flight: stage 1 as ARImage (k coarse labels so far), then one refinement."""

    fine = None

    @property
    def done(self) -> bool:
        return self.fine is not None

    @property
    def in_stage1(self) -> bool:
        return self.k < self.num_iter

    @property
    def num_steps(self) -> int:
        return self.num_iter + 1     # the coarse labels, then one refinement

    @property
    def shape_key(self) -> tuple:
        return ("refine",) if not self.in_stage1 else super().shape_key


class CTFBatcher(ARBatcher):
    """Stage 1 of every image in flight as ELM's AR images (KV-cache slots); an image whose
    coarse labels are complete is refined at the next step, with the other images there (one
    pass per group of images that share a call's settings: CFG on or off, top-k, top-p)."""

    def add(self, label=None, texts=None, settings=None, generator=None) -> CTFImage:
        model, s = self.model, settings
        refuse_speculative(model, s)
        row = int(model._labels(None if label is None else [label], 1)[0])
        cfg1, cfg2 = per_stage("cfg", s["cfg"], lambda n, v: float(_check_number(n, v)))
        t1, t2 = per_stage("temperature", s["temperature"], lambda n, v: float(_check_number(n, v, positive=True)))
        k1, k2 = per_stage("top_k", s["top_k"], lambda n, v: check_top_k(v, n))
        p1, p2 = per_stage("top_p", s["top_p"], lambda n, v: check_top_p(v, n))
        length = model.config.block_size
        scales = None
        if cfg1 != 1.0 or cfg2 != 1.0:
            model._need_null()
        if cfg1 != 1.0:
            per_step = [cfg_at(s["cfg_schedule"], cfg1, step, length) for step in range(length)]
            scales = torch.tensor(np.asarray(per_step, dtype=np.float64), dtype=torch.float32, device=model.device)
        check_image_generator(generator)
        image = CTFImage(row, scales, t1, k1, p1, generator, length)
        image.stage2 = (cfg2, t2, k2, p2)
        return image

    @torch.no_grad()
    def step(self, images: list) -> list:
        """One step of every image given (any subset of those in flight): a coarse label for
        those in stage 1, the refinement for the others. Every draw and refinement is computed
        before any image changes, so a step that raises leaves them as they were."""
        if len(images) != len({id(im) for im in images}) or any(im.done for im in images):
            raise SamplingError("step() takes each image in flight once, none done")
        first = [im for im in images if im.in_stage1]
        second = [im for im in images if not im.in_stage1]
        drawn = []
        if first:
            logits = self.logits(first)
        try:
            if first:
                drawn = draw(first, logits, 1, self.vocab, self.model.device)
            refined = self._refine(second)
        except BaseException:
            for im in first:
                if im.k == 0:
                    self.pool.release(im)
            raise
        append_draws(first, drawn)
        for im in first:
            if not im.in_stage1:
                self.pool.release(im)
        for im, (fine, finite) in zip(second, refined):
            im.fine, im.ok = fine, im.ok & finite
        return second

    def _refine(self, images: list) -> list:
        """(fine tokens, finite) of each image whose coarse labels are complete: one pass per
        group of images that share a call's settings (CFG on or off, top-k, top-p)."""
        groups: dict = {}
        for i, im in enumerate(images):
            cfg2, _, k2, p2 = im.stage2
            groups.setdefault((cfg2 != 1.0, k2, p2), []).append(i)
        model, device = self.model, self.model.device
        out = [None] * len(images)
        for (use_cfg, top_k, top_p), index in groups.items():
            members = [images[i] for i in index]
            coarse = torch.cat([torch.cat(im.out, dim=1) for im in members])              # [n, L]
            labels = torch.tensor([im.label for im in members], dtype=torch.int64, device=device)
            rows = torch.cat([labels, torch.full_like(labels, model.config.num_classes)]) if use_cfg else labels
            scale = torch.tensor([im.stage2[0] for im in members], dtype=torch.float32, device=device)
            temps = torch.tensor([im.stage2[1] for im in members], dtype=torch.float32, device=device)
            noise = torch.cat([model._stage2_noise(1, True, [im.generator]) for im in members])
            fine, _, probs = model.refine(coarse, rows, scale if use_cfg else None, temps, top_k, top_p, noise)
            finite = torch.isfinite(probs).flatten(1).all(dim=1)
            for j, i in enumerate(index):
                out[i] = (fine[j:j + 1], finite[j])
        return out

    def tokens(self, images: list) -> torch.Tensor:
        check_draws(images)
        return torch.cat([im.fine for im in images])

    def preview(self, images: list) -> torch.Tensor:
        """Before the refinement: each coarse label drawn so far as its cluster's first code
        (a blurred picture of the layout); the positions after them hold code 0."""
        from ..models.ctf import codes_to_subtokens

        model, c = self.model, self.model.config
        out = []
        for im in images:
            if im.fine is not None:
                out.append(im.fine)
                continue
            codes = torch.zeros(1, im.num_iter, dtype=torch.int64, device=model.device)
            if im.out:
                coarse = torch.cat(im.out, dim=1)
                codes[:, :coarse.shape[1]] = model.members[coarse, 0]
            out.append(codes_to_subtokens(codes, c.token_each, c.code_dim))
        return torch.cat(out)
