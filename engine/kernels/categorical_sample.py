"""Categorical sampling of one decode step in one kernel: CFG on logits, temperature, top-k,
top-p, softmax and the exponential-race draw; a row is one image x one sub-token (BLOCK_R rows
per program).

The torch reference is engine.ops.categorical.sample_logits (the op order ELM publishes):
    x = u + (c - u) * s          CFG of a doubled batch: rows [0, B) cond, [B, 2B) uncond
    x = x / t                    (CUDA: x * (1 / t), what torch does on CUDA)
    top-k: x < kth -> -inf       kth = the k-th largest value counted with multiplicity
                                 (values tied with it are kept)
    top-p: drop a token when the mass of the tokens sorted before it (descending, ties in
           index order: torch's stable sort) reaches top_p; at least the most likely stays
    p = softmax(x); index = argmax(p / q)     q ~ Exp(1) given (the draw torch.multinomial makes)

How the thresholds are found without sorting (the vocabulary is looped over in blocks, up to
2**16 and beyond; the guided logits are written once to work rows that later passes read):
every fp32 value maps to an int32 key with the same order (sign-magnitude flip; -0 as +0).
Top-k: the k-th largest key by radix select, 4 passes of 8-bit digits (a histogram of the
digits of the keys matching the digits found so far; the k-th lies in the highest digit whose
count from the top reaches k): exact, ties included. Top-p: the smallest key v whose tokens
above it hold less than top_p of the mass (the last value a descending sort keeps), 8 passes
of 4-bit digits (count and mass per digit). Tokens above v are kept; of those tied at v, the
first ones in index order whose preceding mass is below top_p (a stable sort's order, which
engine.ops.categorical.top_p_mask uses).

Exactness: CFG, temperature and the top-k threshold are computed with torch's roundings (no FMA
contraction, IEEE division), so top-k sets are identical. Softmax sums (and top-p's cumulative
mass) are reduced in another order than torch's and exp may differ by an ulp, so an index can
differ only where two candidates of argmax(p / q) lie within a few ulps of each other, or a
top-p boundary within float rounding of top_p: measure-zero events for continuous noise.
bf16 / fp16 logits are upcast to fp32 at load (the reference is sample_logits of
logits.float()). Rows whose probabilities are not finite (NaN logits, an infinite maximum)
get ok = False, as torch.isfinite(probs).all(-1).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .utils import check_rows, interpret, launch

INT32_MIN = tl.constexpr(-2 ** 31)
INT32_MAX = tl.constexpr(2 ** 31 - 1)


@triton.jit
def _order_key(x):
    """fp32 -> int32 with the same order; -0 maps to +0's key (they compare equal, so torch
    sorts them as ties); NaNs land outside the range of the other values."""
    b = tl.where(x == 0.0, 0.0, x).to(tl.int32, bitcast=True)
    return b ^ ((b >> 31) & 0x7FFFFFFF)


@triton.jit
def _key_value(key):
    """The inverse of _order_key (the map is an involution on the bits)."""
    return (key ^ ((key >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _guided(logits_ptr, off_c, off_u, cols, mask, scale, temp,
            HAS_CFG: tl.constexpr, RECIP_TEMP: tl.constexpr):
    """A [rows, block] tile after CFG and temperature, fp32; -inf outside the vocabulary."""
    x = tl.load(logits_ptr + off_c[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_CFG:
        u = tl.load(logits_ptr + off_u[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x = u + (x - u) * scale[:, None]
    if RECIP_TEMP:
        x = x * temp[:, None]      # temp holds the IEEE reciprocal here
    else:
        x = tl.div_rn(x, temp[:, None])
    return tl.where(mask, x, float("-inf"))


@triton.jit
def _filtered(work_ptr, off_w, cols, mask, kth, top_p, v_key, mass_v, p_v, tied_before,
              HAS_TOP_K: tl.constexpr, HAS_TOP_P: tl.constexpr):
    """A tile of the guided logits (read back from the work rows) after top-k and top-p;
    tied_before [rows] counts the boundary-tied tokens of the earlier tiles (index order
    decides which of them top-p keeps)."""
    x = tl.load(work_ptr + off_w[:, None] + cols[None, :], mask=mask, other=float("-inf"))
    if HAS_TOP_K:
        x = tl.where(x < kth[:, None], float("-inf"), x)
    if HAS_TOP_P:
        key = _order_key(x)
        tie = (mask & (key == v_key[:, None])).to(tl.int32)
        rank = tl.cumsum(tie, 1) - tie + tied_before[:, None]
        keep = (key > v_key[:, None]) | ((tie > 0) & (mass_v[:, None] + rank.to(tl.float32) * p_v[:, None]
                                                       < top_p))
        x = tl.where(keep, x, float("-inf"))
        tied_before += tl.sum(tie, 1)
    return x, tied_before


@triton.jit
def _categorical_kernel(logits_ptr, noise_ptr, cfg_ptr, temp_ptr, idx_ptr, work_ptr, ok_ptr,
                        n_rows, V, T, stride_logits, stride_noise, cfg_stride, temp_stride, top_k, top_p,
                        HAS_CFG: tl.constexpr, RECIP_TEMP: tl.constexpr, HAS_TOP_K: tl.constexpr,
                        HAS_TOP_P: tl.constexpr, WRITE_LOGITS: tl.constexpr, BLOCK_R: tl.constexpr,
                        BLOCK: tl.constexpr, BLOCK_P: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < n_rows
    image = rows // T
    rows64 = rows.to(tl.int64)
    off_c = rows64 * stride_logits
    off_u = (rows64 + n_rows) * stride_logits      # the uncond half follows the cond half
    off_w = rows64 * V                             # the work rows: [n_rows, V] contiguous
    offs = tl.arange(0, BLOCK)
    scale = tl.full([BLOCK_R], 1.0, tl.float32)
    if HAS_CFG:
        scale = tl.load(cfg_ptr + image * cfg_stride, mask=rmask, other=1.0)
    temp = tl.load(temp_ptr + image * temp_stride, mask=rmask, other=1.0)
    if RECIP_TEMP:
        temp = tl.div_rn(tl.full([BLOCK_R], 1.0, tl.float32), temp)
    neg_inf = float("-inf")
    zeros_i = tl.zeros([BLOCK_R], tl.int32)
    zeros_f = tl.zeros([BLOCK_R], tl.float32)

    # The guided logits go to the work rows once; every later pass reads one fp32 value per
    # token from there (L1 / L2 resident) instead of redoing CFG from two logit rows.
    for start in range(0, V, BLOCK):
        cols = start + offs
        mask = rmask[:, None] & (cols < V)[None, :]
        x = _guided(logits_ptr, off_c, off_u, cols, mask, scale, temp, HAS_CFG, RECIP_TEMP)
        tl.store(work_ptr + off_w[:, None] + cols[None, :], x, mask=mask)
    tl.debug_barrier()   # the block's threads read what others wrote

    # Top-k: the k-th largest key, one 8-bit digit per pass (radix select, most significant
    # digit first): a histogram of the digits of the keys that match the digits found so far;
    # the k-th lies in the highest digit whose count from the top reaches k. Exact with ties.
    kth = tl.full([BLOCK_R], neg_inf, tl.float32)
    if HAS_TOP_K:
        bins = tl.arange(0, 256)
        row_bins = tl.arange(0, BLOCK_R)[:, None] * 256
        prefix = tl.zeros([BLOCK_R], tl.int64)   # digits found so far, of the key + 2**31
        k_left = zeros_i + top_k
        for j in tl.static_range(4):
            hist = tl.zeros([BLOCK_R * 256], tl.int32)
            for start in range(0, V, BLOCK):
                cols = start + offs
                mask = rmask[:, None] & (cols < V)[None, :]
                x = tl.load(work_ptr + off_w[:, None] + cols[None, :], mask=mask, other=neg_inf)
                u = _order_key(x).to(tl.int64) + 2147483648
                match = mask & ((u >> (32 - 8 * j)) == prefix[:, None])
                digit = ((u >> (24 - 8 * j)) & 255).to(tl.int32) + row_bins
                hist += tl.histogram(tl.reshape(digit, [BLOCK_R * BLOCK]), BLOCK_R * 256,
                                     mask=tl.reshape(match, [BLOCK_R * BLOCK]))
            h = tl.reshape(hist, [BLOCK_R, 256])
            from_top = tl.cumsum(h, 1, reverse=True)          # count of digits >= d
            d = tl.max(tl.where(from_top >= k_left[:, None], bins[None, :], -1), 1)
            k_left -= tl.sum(tl.where(bins[None, :] == d[:, None], from_top - h, 0), 1)
            prefix = prefix * 256 + d
        kth = _key_value((prefix - 2147483648).to(tl.int32))

    # Row maximum (top-k and top-p always keep it), NaNs, the softmax normaliser after top-k.
    m = tl.full([BLOCK_R], neg_inf, tl.float32)
    nans = zeros_i
    for start in range(0, V, BLOCK):
        cols = start + offs
        mask = rmask[:, None] & (cols < V)[None, :]
        x, _ = _filtered(work_ptr, off_w, cols, mask, kth, top_p, zeros_i, zeros_f, zeros_f, zeros_i,
                         HAS_TOP_K, False)
        m = tl.maximum(m, tl.max(x, 1))
        nans += tl.sum((x != x).to(tl.int32), 1)
    total = zeros_f
    for start in range(0, V, BLOCK):
        cols = start + offs
        mask = rmask[:, None] & (cols < V)[None, :]
        x, _ = _filtered(work_ptr, off_w, cols, mask, kth, top_p, zeros_i, zeros_f, zeros_f, zeros_i,
                         HAS_TOP_K, False)
        total += tl.sum(tl.where(mask, tl.exp(x - m[:, None]), 0.0), 1)

    # Top-p: v_key, the smallest key whose tokens above it hold less than top_p of the mass
    # (the last token a descending sort keeps), one 4-bit digit per pass: per digit of the keys
    # matching the digits found so far, their count and mass; the lowest present digit whose
    # mass above stays below top_p holds v_key. mass_v: the mass above v_key.
    v_key = zeros_i
    mass_v = zeros_f
    p_v = zeros_f
    if HAS_TOP_P:
        inv_total = tl.div_rn(tl.full([BLOCK_R], 1.0, tl.float32), total)
        nib = tl.arange(0, 16)
        offs_p = tl.arange(0, BLOCK_P)
        prefix = tl.zeros([BLOCK_R], tl.int64)
        for j in tl.static_range(8):
            mass = tl.zeros([BLOCK_R, 16], tl.float32)
            count = tl.zeros([BLOCK_R, 16], tl.int32)
            for start in range(0, V, BLOCK_P):
                cols = start + offs_p
                mask = rmask[:, None] & (cols < V)[None, :]
                x = tl.load(work_ptr + off_w[:, None] + cols[None, :], mask=mask, other=neg_inf)
                if HAS_TOP_K:
                    x = tl.where(x < kth[:, None], neg_inf, x)
                u = _order_key(x).to(tl.int64) + 2147483648
                match = mask & ((u >> (32 - 4 * j)) == prefix[:, None])
                digit = ((u >> (28 - 4 * j)) & 15).to(tl.int32)
                hit = match[:, :, None] & (digit[:, :, None] == nib[None, None, :])
                p = tl.exp(x - m[:, None]) * inv_total[:, None]
                mass += tl.sum(tl.where(hit, p[:, :, None], 0.0), 1)
                count += tl.sum(hit.to(tl.int32), 1)
            above = mass_v[:, None] + (tl.cumsum(mass, 1, reverse=True) - mass)
            d = tl.min(tl.where((count > 0) & (above < top_p), nib[None, :], 16), 1)
            mass_v = tl.sum(tl.where(nib[None, :] == d[:, None], above, 0.0), 1)
            prefix = prefix * 16 + d
        v_key = (prefix - 2147483648).to(tl.int32)
        p_v = tl.exp(_key_value(v_key) - m) * inv_total
        # The normaliser of the final distribution (what softmax of the filtered logits sums).
        total = zeros_f
        tied = zeros_i
        for start in range(0, V, BLOCK):
            cols = start + offs
            mask = rmask[:, None] & (cols < V)[None, :]
            x, tied = _filtered(work_ptr, off_w, cols, mask, kth, top_p, v_key, mass_v, p_v, tied,
                                HAS_TOP_K, HAS_TOP_P)
            total += tl.sum(tl.where(mask, tl.exp(x - m[:, None]), 0.0), 1)

    # The draw: the first index of max(p / q); a NaN ratio wins, as in torch.argmax.
    inv_total = tl.div_rn(tl.full([BLOCK_R], 1.0, tl.float32), total)
    best = tl.full([BLOCK_R], -1.0, tl.float32)
    best_i = zeros_i
    nan_i = tl.full([BLOCK_R], INT32_MAX, tl.int32)
    tied = zeros_i
    off_q = rows64 * stride_noise
    for start in range(0, V, BLOCK):
        cols = start + offs
        mask = rmask[:, None] & (cols < V)[None, :]
        x, tied = _filtered(work_ptr, off_w, cols, mask, kth, top_p, v_key, mass_v, p_v, tied,
                            HAS_TOP_K, HAS_TOP_P)
        q = tl.load(noise_ptr + off_q[:, None] + cols[None, :], mask=mask, other=1.0)
        r = tl.where(mask, tl.div_rn(tl.exp(x - m[:, None]) * inv_total[:, None], q), -1.0)
        is_nan = r != r
        block_best = tl.max(tl.where(is_nan, -1.0, r), 1)
        block_i = tl.min(tl.where(mask & (r == block_best[:, None]), cols[None, :], INT32_MAX), 1)
        better = block_best > best
        best_i = tl.where(better, block_i, best_i)
        best = tl.where(better, block_best, best)
        nan_i = tl.minimum(nan_i, tl.min(tl.where(mask & is_nan, cols[None, :], INT32_MAX), 1))
        if WRITE_LOGITS:
            # Each thread rewrites the elements it has just read (same tile, same layout).
            tl.store(work_ptr + off_w[:, None] + cols[None, :], x, mask=mask)
    index = tl.where(nan_i < INT32_MAX, nan_i, best_i)
    tl.store(idx_ptr + rows, index.to(tl.int64), mask=rmask)
    tl.store(ok_ptr + rows, (nans == 0) & (m > neg_inf) & (m < float("inf")), mask=rmask)


def categorical_config(n_rows: int, V: int) -> dict:
    """Tiles of BLOCK_R rows x BLOCK tokens. GPU: one row per program once a row fills a
    block (rows spread over the SMs), several short rows per program below that. The
    interpreter runs programs one after another: all rows in one program."""
    block = min(triton.next_power_of_2(max(V, 16)), 4096)
    if interpret():
        block_r = min(triton.next_power_of_2(max(n_rows, 1)), 64)
        block = min(block, max(16, 65536 // block_r))
        return dict(BLOCK_R=block_r, BLOCK=block, BLOCK_P=block, num_warps=4)
    block_r = max(1, min(16, 512 // block))
    # Top-p's passes hold [rows, BLOCK_P, 16] tiles: a shorter block keeps them in registers.
    return dict(BLOCK_R=block_r, BLOCK=block, BLOCK_P=max(16, 256 // block_r),
                num_warps=8 if block >= 2048 else 4)


def _row_values(value, name: str, bsz: int, device) -> tuple[torch.Tensor, int]:
    """A 0-d or [bsz] float32 tensor and the stride that reads image b's value (0: shared)."""
    if not isinstance(value, torch.Tensor) or value.dim() > 1 or (value.dim() == 1 and value.shape[0] != bsz):
        shape = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"{name} must be a 0-d or [{bsz}] float32 tensor (one per image), got {shape}")
    value = value.to(device=device, dtype=torch.float32).contiguous()
    return value, (1 if value.dim() == 1 else 0)


def launch_categorical(logits, noise, cfg_scale, temperature, top_k=None, top_p=None, write_logits=True,
                       config=None):
    """(indices [B, T] int64, filtered logits [B, T, V] float32 (empty [0] without
    write_logits), ok [B, T] bool) from logits [B', T, V] (B' = 2B with cfg_scale) and noise
    [B, T, V]; cfg_scale / temperature 0-d or [B] tensors."""
    if logits.dim() != 3 or noise.dim() != 3:
        raise ValueError(f"logits and noise must be [B, T, V], got {list(logits.shape)} and {list(noise.shape)}")
    rows_in, T, V = logits.shape
    bsz = noise.shape[0]
    want = 2 * bsz if cfg_scale is not None else bsz
    if rows_in != want or tuple(noise.shape[1:]) != (T, V):
        raise ValueError(f"expected logits [{want}, {T}, {V}] for noise {list(noise.shape)} "
                         f"({'with' if cfg_scale is not None else 'without'} CFG), got {list(logits.shape)}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if noise.dtype != torch.float32:
        raise ValueError(f"noise must be float32, got {noise.dtype}")
    device = logits.device
    flat = logits.reshape(rows_in * T, V)
    q = noise.reshape(bsz * T, V)
    check_rows(flat, "logits")
    check_rows(q, "noise")
    temperature, temp_stride = _row_values(temperature, "temperature", bsz, device)
    if cfg_scale is not None:
        cfg_scale, cfg_stride = _row_values(cfg_scale, "cfg_scale", bsz, device)
    else:
        cfg_scale, cfg_stride = temperature, 0   # never read
    idx = torch.empty(bsz, T, dtype=torch.int64, device=device)
    ok = torch.empty(bsz, T, dtype=torch.bool, device=device)
    # The work rows: the guided logits, then (write_logits) the filtered ones.
    work = torch.empty(bsz, T, V, dtype=torch.float32, device=device)
    n_rows = bsz * T
    if n_rows:
        cfg = dict(config or categorical_config(n_rows, V))
        num_warps = cfg.pop("num_warps", 4)
        has_top_k = top_k is not None and top_k < V       # k >= V keeps every value
        has_top_p = top_p is not None and top_p < 1.0     # as sample_logits: 1.0 filters nothing
        # No FMA contraction: CFG rounds as u + (c - u) * s does in torch.
        launch("categorical_sample", _categorical_kernel, (triton.cdiv(n_rows, cfg["BLOCK_R"]),),
               flat, q, cfg_scale, temperature, idx, work, ok,
               n_rows, V, T, flat.stride(0), q.stride(0), cfg_stride, temp_stride,
               int(top_k) if has_top_k else 0, float(top_p) if has_top_p else 1.0,
               HAS_CFG=cfg_scale is not temperature, RECIP_TEMP=device.type == "cuda",
               HAS_TOP_K=has_top_k, HAS_TOP_P=has_top_p, WRITE_LOGITS=bool(write_logits),
               num_warps=num_warps, enable_fp_fusion=False, **cfg)
    return idx, (work if write_logits else work.new_empty(0)), ok


@torch.library.custom_op("engine::categorical_sample", mutates_args=())
def categorical_sample(logits: torch.Tensor, noise: torch.Tensor, cfg_scale: Optional[torch.Tensor],
                       temperature: torch.Tensor, top_k: Optional[int] = None, top_p: Optional[float] = None,
                       write_logits: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(indices [B, T], filtered logits [B, T, V] or [0], ok [B, T]); see the module docstring."""
    return launch_categorical(logits, noise, cfg_scale, temperature, top_k, top_p, write_logits)


@categorical_sample.register_fake
def _(logits, noise, cfg_scale, temperature, top_k=None, top_p=None, write_logits=True):
    bsz, T, V = noise.shape
    return (noise.new_empty((bsz, T), dtype=torch.int64),
            noise.new_empty((bsz, T, V) if write_logits else (0,), dtype=torch.float32),
            noise.new_empty((bsz, T), dtype=torch.bool))


def categorical_sample_ref(logits, noise, cfg_scale, temperature, top_k=None, top_p=None):
    """Plain torch: engine.ops.categorical.sample_logits on the fp32 logits; (indices, filtered
    logits, ok per row)."""
    from engine.ops.categorical import sample_logits

    idx, filtered, probs = sample_logits(logits.float(), noise, cfg_scale, temperature, top_k, top_p)
    return idx, filtered, torch.isfinite(probs).all(-1)
