"""The diffusion head's ResBlock and final layer (+ DDPM update), one launch each.

ResBlock, one launch: out = h + gate * fc2(silu(fc1(LN(h) * (1 + scale) + shift))).
fc1 needs whole LN rows and fc2 needs whole hidden rows, so without a grid-wide sync some work
must be shared or redone. Grid = (output column tiles x hidden splits, row tiles):
  * each program owns BN output columns and a slice of HID_PER hidden units; it recomputes the
    modulated LN for its rows (cheap: M x w), runs fc1 for its hidden slice only and adds that
    slice's contribution to its fc2 columns. fc1 is redone once per column tile, never per row.
  * SPLIT == 1: the program owns all hidden units and finishes the tile itself (the classic
    "split over fc2 columns, recompute fc1" scheme, best at small widths).
  * SPLIT > 1 (wide heads, few rows: more CTAs, less redundant fc1 per CTA): partial fc2 tiles
    go to an fp32 workspace; the last program of a tile to arrive (an acq_rel ticket counter)
    sums the partials in fixed split order, so results are deterministic, adds bias, gate and
    residual, and re-arms the counter to zero for the next launch. Ordering (PTX, checked in
    the generated code, not yet on hardware): all threads store -> bar.sync -> one thread's
    atom.acq_rel.gpu -> bar.sync -> L2 (.cg) loads. One set of counters per device: launches
    on concurrent streams must not share it.
With CFG the first block reads h with `h_rows` = n < M rows (row r uses h[r % n]): the
duplicated half of x is projected once by input_proj and never copied.

Final layer + DDPM, one launch: LN (no affine) + modulation + linear to (eps, v) for the cond
row and, with CFG, the uncond row of the same token in the same program, then the update of
ddpm_update.py with that row's CFG scale and temperature (float32 [n], loaded per row). Every
program owns whole rows, so no cross-program reduction is needed.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .ddpm_update import cfg_eps, ddpm_step, ddpm_update_ref, row_args
from .modulated_layernorm import modln_tile
from .utils import check_rows, dot_precision, interpret, launch, pow2, row_moments, silu

LN_EPS = 1e-6


@triton.jit
def _resblock_kernel(h_ptr, mod_ptr, lnw_ptr, lnb_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr,
                     out_ptr, ws_ptr, cnt_ptr, M, H_ROWS, W, stride_h, stride_mod, stride_out, eps,
                     SPLIT: tl.constexpr, HID_PER: tl.constexpr, PRECISION: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BJ: tl.constexpr, BK: tl.constexpr):
    pid_n = tl.program_id(0) // SPLIT
    pid_s = tl.program_id(0) % SPLIT
    pid_m = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    rmask = rows < M
    hrows = rows % H_ROWS
    mean, rstd = row_moments(h_ptr, hrows, stride_h, rmask, W, eps, BM, BK)
    rn = pid_n * BN + tl.arange(0, BN)
    nmask = rn < W
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for j0 in range(pid_s * HID_PER, pid_s * HID_PER + HID_PER, BJ):
        rj = j0 + tl.arange(0, BJ)
        jmask = rj < W
        acc1 = tl.zeros([BM, BJ], dtype=tl.float32)
        for k0 in range(0, W, BK):
            rk = k0 + tl.arange(0, BK)
            kmask = rk < W
            m = rmask[:, None] & kmask[None, :]
            hk = tl.load(h_ptr + hrows[:, None] * stride_h + rk[None, :], mask=m, other=0.0)
            shift = tl.load(mod_ptr + rows[:, None] * stride_mod + rk[None, :], mask=m, other=0.0)
            scale = tl.load(mod_ptr + rows[:, None] * stride_mod + W + rk[None, :], mask=m, other=0.0)
            lnw = tl.load(lnw_ptr + rk, mask=kmask, other=0.0).to(tl.float32)
            lnb = tl.load(lnb_ptr + rk, mask=kmask, other=0.0).to(tl.float32)
            # The modulated LN is recomputed per hidden chunk: cheaper than a round trip.
            u = modln_tile(hk.to(tl.float32), mean, rstd, lnw, lnb, shift, scale, True)
            u = tl.where(m, u, 0.0)
            w1 = tl.load(w1_ptr + rj[:, None] * W + rk[None, :],
                         mask=jmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
            acc1 = tl.dot(u, tl.trans(w1), acc1, input_precision=PRECISION)
        # Hidden units past W: acc1 = 0 and bias 0, and silu(0) = 0 adds nothing below.
        g = silu(acc1 + tl.load(b1_ptr + rj, mask=jmask, other=0.0).to(tl.float32)[None, :])
        w2 = tl.load(w2_ptr + rn[:, None] * W + rj[None, :],
                     mask=nmask[:, None] & jmask[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(g, tl.trans(w2), acc, input_precision=PRECISION)

    omask = rmask[:, None] & nmask[None, :]
    done = True
    if SPLIT > 1:
        tile = ws_ptr + rows[:, None] * W + rn[None, :]
        tl.store(tile + pid_s * M * W, acc, mask=omask)
        tl.debug_barrier()  # every warp's partial is written before the release below
        counter = cnt_ptr + pid_m * (tl.num_programs(0) // SPLIT) + pid_n
        ticket = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        done = ticket == SPLIT - 1
        if done:
            acc = tl.zeros([BM, BN], dtype=tl.float32)
            for s in range(SPLIT):  # fixed order: bitwise the same whichever program is last
                acc += tl.load(tile + s * M * W, mask=omask, other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(counter, 0)
    if done:
        u = acc + tl.load(b2_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
        res = tl.load(h_ptr + hrows[:, None] * stride_h + rn[None, :], mask=omask, other=0.0)
        gate = tl.load(mod_ptr + rows[:, None] * stride_mod + 2 * W + rn[None, :], mask=omask,
                       other=0.0)
        tl.store(out_ptr + rows[:, None] * stride_out + rn[None, :],
                 res.to(tl.float32) + gate * u, mask=omask)


def resblock_config(M: int, W: int, device: torch.device) -> dict:
    if interpret():  # fixed rule: whole width in one tile, one split (few interpreted programs)
        t = pow2(W, hi=256)
        return dict(BM=pow2(M, hi=64), BN=t, BJ=t, BK=t, SPLIT=1, num_warps=4)
    return gpu_resblock_config(M, W, _sm_count(device))


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def gpu_resblock_config(M: int, W: int, sms: int) -> dict:
    """Untuned rule (no GPU was at hand to tune it): split the hidden dim until the grid
    roughly fills the SMs (few rows, wide head), else one split (many rows already give enough
    programs). fc1 is redone once per column tile, so wide heads take wider column tiles
    (fewer redundant fc1 FLOPs, larger fixup sums); 8 warps keep those free of spills."""
    BM, BJ = pow2(M, hi=32), 64
    BN, num_warps = (128, 8) if W >= 512 else (64, 4)
    tiles = triton.cdiv(W, BN) * triton.cdiv(M, BM)
    split = max(1, min(sms // tiles, triton.cdiv(W, BJ)))
    return dict(BM=BM, BN=BN, BJ=BJ, BK=64, SPLIT=split, num_warps=num_warps)


def split_plan(W: int, BJ: int, split: int) -> tuple[int, int]:
    """(splits, hidden units per split): whole BJ chunks per split and no empty split."""
    hid_per = triton.cdiv(triton.cdiv(W, split), BJ) * BJ
    return triton.cdiv(W, hid_per), hid_per


_COUNTERS: dict = {}


def ticket_counters(device: torch.device, size: int = 4096) -> torch.Tensor:
    """Ticket counters, zero between launches (every launch re-arms the ones it used).
    Backends reserve them when binding a model, outside any CUDA-graph capture."""
    device = torch.device(device)
    cnt = _COUNTERS.get(device)
    if cnt is None or cnt.numel() < size:
        cnt = torch.zeros(max(size, 4096), dtype=torch.int32, device=device)
        _COUNTERS[device] = cnt
    return cnt


def launch_resblock(h, mods, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                    eps=LN_EPS, config=None):
    check_rows(h, "h")
    check_rows(mods, "mods")
    H, W = h.shape
    M = mods.shape[0]
    if mods.shape[1] != 3 * W or H == 0 or M % H:
        raise ValueError(f"mods must be [M, {3 * W}] (shift|scale|gate) with M a multiple of "
                         f"h's {H} rows, got {tuple(mods.shape)}")
    for wt in (fc1_weight, fc2_weight):
        if wt.shape != (W, W) or not wt.is_contiguous():
            raise ValueError(f"fc weights must be contiguous [{W}, {W}]")
    out = torch.empty(M, W, device=h.device, dtype=torch.float32)
    cfg = dict(config or resblock_config(M, W, h.device))
    num_warps, split = cfg.pop("num_warps", 4), cfg.pop("SPLIT")
    split, hid_per = split_plan(W, cfg["BJ"], split)
    n_tiles, m_tiles = triton.cdiv(W, cfg["BN"]), triton.cdiv(M, cfg["BM"])
    ws = torch.empty(split * M * W if split > 1 else 1, device=h.device, dtype=torch.float32)
    cnt = ticket_counters(h.device, n_tiles * m_tiles)
    launch("resblock", _resblock_kernel, (n_tiles * split, m_tiles),
           h, mods, ln_weight.contiguous(), ln_bias.contiguous(),
           fc1_weight, fc1_bias.contiguous(), fc2_weight, fc2_bias.contiguous(),
           out, ws, cnt, M, H, W, h.stride(0), mods.stride(0), out.stride(0), eps,
           SPLIT=split, HID_PER=hid_per, PRECISION=dot_precision(fc1_weight.dtype),
           num_warps=num_warps, enable_fp_fusion=True, **cfg)
    return out


@torch.library.custom_op("engine::resblock", mutates_args=())
def resblock(h: torch.Tensor, mods: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor,
             fc1_weight: torch.Tensor, fc1_bias: torch.Tensor, fc2_weight: torch.Tensor,
             fc2_bias: torch.Tensor) -> torch.Tensor:
    """One ResBlock for M = mods.shape[0] rows; row r reads h[r % h.shape[0]].
    (The ticket counters it uses internally are back to zero when it returns.)"""
    return launch_resblock(h, mods, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias)


@resblock.register_fake
def _(h, mods, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias):
    return h.new_empty((mods.shape[0], h.shape[1]), dtype=torch.float32)


def resblock_ref(h, mods, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps=LN_EPS):
    W = h.shape[1]
    h = h.float().repeat(mods.shape[0] // h.shape[0], 1)
    shift, scale, gate = mods[:, :W].float(), mods[:, W:2 * W].float(), mods[:, 2 * W:].float()
    u = F.layer_norm(h, (W,), ln_weight.float(), ln_bias.float(), eps) * (1 + scale) + shift
    u = F.silu(F.linear(u, fc1_weight.float(), fc1_bias.float()))
    u = F.linear(u, fc2_weight.float(), fc2_bias.float())
    return h + gate * u


@triton.jit
def _final_rows(h_ptr, mod_ptr, w_ptr, b_ptr, rows, hrows, rmask, W, C, stride_h, stride_mod, eps,
                PRECISION: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr):
    """(eps, v) [BM, BC] of the final layer for BM rows: linear(LN(h) * (1 + scale) + shift)."""
    mean, rstd = row_moments(h_ptr, hrows, stride_h, rmask, W, eps, BM, BK)
    rc = tl.arange(0, BC)
    cmask = rc < C
    acc_e = tl.zeros([BM, BC], dtype=tl.float32)
    acc_v = tl.zeros([BM, BC], dtype=tl.float32)
    for k0 in range(0, W, BK):
        rk = k0 + tl.arange(0, BK)
        kmask = rk < W
        m = rmask[:, None] & kmask[None, :]
        x = tl.load(h_ptr + hrows[:, None] * stride_h + rk[None, :], mask=m, other=0.0)
        shift = tl.load(mod_ptr + rows[:, None] * stride_mod + rk[None, :], mask=m, other=0.0)
        scale = tl.load(mod_ptr + rows[:, None] * stride_mod + W + rk[None, :], mask=m, other=0.0)
        u = modln_tile(x.to(tl.float32), mean, rstd, None, None, shift, scale, False)
        u = tl.where(m, u, 0.0)
        wm = cmask[:, None] & kmask[None, :]
        w_e = tl.load(w_ptr + rc[:, None] * W + rk[None, :], mask=wm, other=0.0).to(tl.float32)
        w_v = tl.load(w_ptr + (C + rc)[:, None] * W + rk[None, :], mask=wm, other=0.0).to(tl.float32)
        acc_e = tl.dot(u, tl.trans(w_e), acc_e, input_precision=PRECISION)
        acc_v = tl.dot(u, tl.trans(w_v), acc_v, input_precision=PRECISION)
    b_e = tl.load(b_ptr + rc, mask=cmask, other=0.0).to(tl.float32)
    b_v = tl.load(b_ptr + C + rc, mask=cmask, other=0.0).to(tl.float32)
    return acc_e + b_e[None, :], acc_v + b_v[None, :]


@triton.jit
def _final_kernel(h_ptr, mod_ptr, w_ptr, b_ptr, x_ptr, noise_ptr, coeff_ptr, cfg_ptr, temp_ptr,
                  new_ptr, n, H_ROWS, W, C, stride_h, stride_mod, stride_x, stride_noise, stride_new,
                  eps, clip_lo, clip_hi,
                  HAS_CFG: tl.constexpr, HAS_CLIP: tl.constexpr, PRECISION: tl.constexpr,
                  BM: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    rmask = rows < n
    e, v = _final_rows(h_ptr, mod_ptr, w_ptr, b_ptr, rows, rows % H_ROWS, rmask, W, C,
                       stride_h, stride_mod, eps, PRECISION, BM, BC, BK)
    if HAS_CFG:  # the uncond row of the same token: row r + n
        e_u, _v_u = _final_rows(h_ptr, mod_ptr, w_ptr, b_ptr, rows + n, (rows + n) % H_ROWS, rmask,
                                W, C, stride_h, stride_mod, eps, PRECISION, BM, BC, BK)
        e = cfg_eps(e, e_u, tl.load(cfg_ptr + rows, mask=rmask, other=0.0)[:, None])
    rc = tl.arange(0, BC)
    m = rmask[:, None] & (rc < C)[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_x + rc[None, :], mask=m, other=0.0)
    noise = tl.load(noise_ptr + rows[:, None] * stride_noise + rc[None, :], mask=m, other=0.0)
    temp = tl.load(temp_ptr + rows, mask=rmask, other=0.0)[:, None]
    new = ddpm_step(x, e, v, coeff_ptr, noise, temp, clip_lo, clip_hi, HAS_CLIP)
    tl.store(new_ptr + rows[:, None] * stride_new + rc[None, :], new, mask=m)


def final_config(n: int, W: int, C: int) -> dict:
    if interpret():
        return dict(BM=pow2(n, hi=64), BC=pow2(C), BK=pow2(W, hi=256), num_warps=4)
    return dict(BM=16, BC=pow2(C), BK=64 if C <= 16 else 32, num_warps=4)


def launch_final(h, mods, out_weight, out_bias, x, noise, coeffs, cfg_scale, temperature,
                 clip_lo=None, clip_hi=None, eps=LN_EPS, config=None):
    """cfg_scale / temperature: numbers or float32 [n] tensors (one per result row)."""
    for t, name in ((h, "h"), (mods, "mods"), (x, "x"), (noise, "noise")):
        check_rows(t, name)
    H, W = h.shape
    n, C = x.shape
    cfg_scale, temperature = row_args(cfg_scale, temperature, n, x.device)
    rows = 2 * n if cfg_scale is not None else n
    if mods.shape != (rows, 2 * W) or out_weight.shape != (2 * C, W) or rows % H \
            or noise.shape[0] < n or noise.shape[1] != C:
        raise ValueError(f"final layer: expected mods [{rows}, {2 * W}], out_weight [{2 * C}, {W}], "
                         f"h rows dividing {rows}, noise [>= {n}, {C}]; got {tuple(mods.shape)}, "
                         f"{tuple(out_weight.shape)}, {tuple(h.shape)}, {tuple(noise.shape)}")
    if coeffs.shape != (7,) or coeffs.dtype != torch.float32 or (clip_lo is None) != (clip_hi is None):
        raise ValueError("coeffs must be one float32 table row [7]; clip needs both bounds or none")
    new = torch.empty(n, C, device=x.device, dtype=torch.float32)
    if n == 0:
        return new
    cfg = dict(config or final_config(n, W, C))
    num_warps = cfg.pop("num_warps", 4)
    # No FMA contraction: the DDPM math rounds as in the torch reference. Without CFG cfg_ptr
    # is never read (temperature stands in: any fp32 pointer).
    launch("final_ddpm", _final_kernel, (triton.cdiv(n, cfg["BM"]),),
           h, mods, out_weight.contiguous(), out_bias.contiguous(), x, noise,
           coeffs.contiguous(), temperature if cfg_scale is None else cfg_scale, temperature,
           new, n, H, W, C,
           h.stride(0), mods.stride(0), x.stride(0), noise.stride(0), new.stride(0), eps,
           0.0 if clip_lo is None else float(clip_lo),
           0.0 if clip_hi is None else float(clip_hi),
           HAS_CFG=cfg_scale is not None, HAS_CLIP=clip_lo is not None,
           PRECISION=dot_precision(out_weight.dtype), num_warps=num_warps,
           enable_fp_fusion=False, **cfg)
    return new


@torch.library.custom_op("engine::final_ddpm", mutates_args=())
def final_ddpm(h: torch.Tensor, mods: torch.Tensor, out_weight: torch.Tensor, out_bias: torch.Tensor,
               x: torch.Tensor, noise: torch.Tensor, coeffs: torch.Tensor,
               cfg_scale: Optional[torch.Tensor], temperature: torch.Tensor,
               clip_lo: Optional[float] = None, clip_hi: Optional[float] = None) -> torch.Tensor:
    """Final layer on h (row r reads h[r % h.shape[0]]) with mods = (shift | scale) [R, 2W],
    then one DDPM step of x [n, C]; returns the new x. cfg_scale (None: no CFG) and temperature
    are float32 [n], one per result row."""
    return launch_final(h, mods, out_weight, out_bias, x, noise, coeffs, cfg_scale, temperature,
                        clip_lo, clip_hi)


@final_ddpm.register_fake
def _(h, mods, out_weight, out_bias, x, noise, coeffs, cfg_scale, temperature, clip_lo=None, clip_hi=None):
    return x.new_empty(x.shape, dtype=torch.float32)


def final_ddpm_ref(h, mods, out_weight, out_bias, x, noise, coeffs, cfg_scale, temperature,
                   clip_lo=None, clip_hi=None, eps=LN_EPS):
    W = h.shape[1]
    h = h.float().repeat(mods.shape[0] // h.shape[0], 1)
    u = F.layer_norm(h, (W,), None, None, eps) * (1 + mods[:, W:].float()) + mods[:, :W].float()
    out = F.linear(u, out_weight.float(), out_bias.float())
    return ddpm_update_ref(x, out, noise, coeffs, cfg_scale, temperature, clip_lo, clip_hi)
