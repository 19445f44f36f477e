"""Roofline of MAR sampling on this CPU: every part's FLOPs and bytes from its shapes, its measured
time, and the fraction of the bound (compute or memory) it reaches.

    python benchmarks/roofline.py [--threads 2] [--configs mar_b_bsz1 mar_b_bsz16 short64 mar_b_bsz1_bf16]
        [--end-to-end [CASE ...]] [--out benchmarks/results/roofline.json]   # + roofline.md / .png
        [--roofs-from benchmarks/results/roofline.json]   # never below an earlier run's roofs

Roofs: the float32 and bf16 GEMM peaks through the libraries the engine calls (MKL F.linear and
packed sgemm, oneDNN with reordered weights: the best over large products; bf16 where oneDNN has
no bf16 kernels: the widened product, float32 arithmetic on bf16 values) and the streaming
bandwidth of a copy (bytes read + written) and of a read (a sum: what weights streamed into
products see; 1.4x the copy from DRAM on Zen 1) at working sets from 64 KB (L2) to 512 MB
(DRAM), each the best of three measurements, re-measured before every case and only ever raised
(this VM's speed drifts by up to 1.5x over minutes; a roof caught in a slow moment made fractions
exceed 1). A phase's bound is max(FLOPs / peak, bytes / bandwidth at its working set: the read
one for weight streams); a part made of phases that run one after the other (the head loop:
cond_embed, the batched adaLN products, the per-step fc products) is bounded by the
sum of theirs; fraction = bound / measured (1.0 = at the roof).

Parts, for a call of `num_iter` MAR steps x `T` diffusion steps (CFG doubles the rows):
  * per transformer block (encoder over buffer + known rows, decoder over buffer + all rows):
    norm1, qkv, attention (engine.ops.attention: the native kernel, SDPA for few queries), proj,
    residual adds, norm2, fc1 with its GELU post-op, fc2 — each run on the
    model's own modules (packed oneDNN linears, as the native backend binds them) at the shapes of
    `--sampled-steps` steps spread over the schedule, interpolated over the others;
  * embed / gather / scatter (z_proj, position rows, the decoder's mask-token scatter, the
    predicted rows' gather);
  * the head loop: the native backend's loop on the step's predicted rows for T diffusion steps
    (bytes: the fc weights once per diffusion step, the adaLN weights once per MAR step, which is
    what the native loop reads; FLOPs: every head product for every row and step; bound: the
    adaLN products compute-bound plus the fc products at max(compute, weights / bandwidth));
  * the DDPM update (engine.ops.head.ddpm_update, the torch statement; inside the native loop
    it is fused, so it is reported, not added);
  * Python and dispatch per MAR step: a model of the same depth, sequence and head depth at
    width 64 (compute negligible) timed end to end per MAR step, minus its parts.
The predicted total is the sum of the parts; `--end-to-end` also times the real call (minutes
for MAR-B shapes) and reports measured / predicted and measured / floor.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from gemm import BF16_METHODS, bandwidth_gbs, median_time, methods  # noqa: E402
from stamp import machine_stamp  # noqa: E402

from engine.ops.attention import attention  # noqa: E402
from engine.core.config import PRESETS, MARConfig  # noqa: E402
from engine.families.mar import MARModel  # noqa: E402
from engine.models.mar import MAR, gather_rows  # noqa: E402
from engine.core.plan import mask_schedule  # noqa: E402

F32 = 4


@dataclass(frozen=True)
class Case:
    name: str
    preset: str
    img_size: int      # 256 -> 16 x 16 = 256 tokens; 128 -> 64 tokens (vae_stride 16, patch 1)
    bsz: int
    num_iter: int
    diffusion_steps: int
    cfg: bool = True
    precision: str = "fp32"   # "bf16": engine.load(precision="bf16"): autocast transformer, bf16 head


CASES = {
    "mar_b_bsz1": Case("MAR-B, batch 1, CFG, 64 x 100", "mar_base", 256, 1, 64, 100),
    "mar_b_bsz16": Case("MAR-B, batch 16, CFG, 64 x 100", "mar_base", 256, 16, 64, 100),
    "short64": Case("MAR-B, 64 tokens, batch 1, CFG, 16 x 100", "mar_base", 128, 1, 16, 100),
    "mar_b_bsz1_bf16": Case("MAR-B, batch 1, CFG, 64 x 100, bf16", "mar_base", 256, 1, 64, 100,
                            precision="bf16"),
}


def random_model(case: Case, width: int | None = None, backend: str = "native") -> MARModel:
    sizes = dict(PRESETS[case.preset])
    if width is not None:   # the overhead probe: same depths and sequence, negligible compute
        sizes.update(encoder_embed_dim=width, decoder_embed_dim=width, diffloss_w=width,
                     encoder_num_heads=4, decoder_num_heads=4)
    config = MARConfig(img_size=case.img_size, num_sampling_steps=str(case.diffusion_steps), **sizes)
    torch.manual_seed(0)
    mar = MAR(config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in mar.named_parameters():
            if p.dim() == 1 and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(max(p.shape[-1], 1)))
    return MARModel(mar, backend=backend, precision=case.precision)


# Roofs -------------------------------------------------------------------------------------------
def roofs(rounds: int = 3) -> dict:
    """The machine's roofs: the best of `rounds` measurements of each (a shared VM's speed drifts
    by up to 1.5x over minutes; a roof measured in a slow moment would flatter every fraction)."""
    peaks = {}
    curve = [[ws, 0.0] for ws in WORKING_SETS]
    read_curve = [[ws, 0.0] for ws in WORKING_SETS]
    for _ in range(rounds):
        for name in ("aten_mkl", "mkl_packed", "onednn", *BF16_METHODS):
            for m, n, k in ((1024, 1024, 1024), (2048, 2048, 2048), (640, 3072, 768)):
                fn = methods(m, n, k).get(name)
                if fn is not None:
                    peaks[name] = max(peaks.get(name, 0.0), 2 * m * n * k / median_time(fn) / 1e9)
        for point, read_point in zip(curve, read_curve):
            point[1] = max(point[1], copy_bandwidth_gbs(point[0]))
            read_point[1] = max(read_point[1], point[1], read_bandwidth_gbs(point[0]))
    for c in (curve, read_curve):
        for i in range(len(c) - 2, -1, -1):   # a smaller working set streams at least as fast
            c[i][1] = max(c[i][1], c[i + 1][1])
    fp32 = max(v for k, v in peaks.items() if k not in BF16_METHODS)
    bf16 = max(v for k, v in peaks.items() if k in BF16_METHODS)
    return {"fp32_gflops": fp32, "bf16_gflops": bf16,
            "bandwidth_gbs": curve[-1][1], "bandwidth_by_working_set": curve,
            "read_bandwidth_gbs": read_curve[-1][1], "read_bandwidth_by_working_set": read_curve,
            "peaks_by_library": peaks}


def merge_roofs(a: dict, b: dict) -> dict:
    """The higher of two roof measurements, roof by roof."""
    out = dict(a)
    for key in ("fp32_gflops", "bf16_gflops", "bandwidth_gbs", "read_bandwidth_gbs"):
        out[key] = max(a.get(key, 0.0), b[key])   # results before the read roof lack it
    for key in ("bandwidth_by_working_set", "read_bandwidth_by_working_set"):
        out[key] = [[ws, max(x, y)] for (ws, x), (_, y) in zip(a.get(key, b[key]), b[key])]
    out["peaks_by_library"] = {k: max(a["peaks_by_library"].get(k, 0.0), v)
                               for k, v in b["peaks_by_library"].items()}
    return out


# Working sets (bytes read + written by one copy) for the cache-aware memory roof: an op whose
# data fits in L2 / L3 streams it faster than DRAM, so its bound uses the bandwidth measured at
# its own size (one DRAM number made residual adds "4.5x faster than the roof").
WORKING_SETS = [2 ** 16, 2 ** 18, 2 ** 20, 2 ** 22, 2 ** 24, 2 ** 26, 2 ** 28, 2 ** 29]
ROOF: dict = {}   # set by main(): the measured roofs every bound below reads
# The case being measured: the GEMM peak its products reach and its transformer's element size
# (bf16 cases: autocast products at the bf16 peak, 2-byte weights and activations).
CURRENT = {"peak_gflops": 0.0, "elem": 4}


def copy_bandwidth_gbs(working_set: int) -> float:
    src = torch.ones(working_set // 8)
    dst = torch.empty_like(src)
    t = median_time(lambda: dst.copy_(src), min_seconds=0.3, max_calls=20000)
    return working_set / t / 1e9


def read_bandwidth_gbs(working_set: int) -> float:
    src = torch.ones(working_set // 4)
    t = median_time(lambda: src.sum(), min_seconds=0.3, max_calls=20000)
    return working_set / t / 1e9


def bandwidth_at(working_set: float, read: bool = False) -> float:
    """GB/s for an op touching `working_set` bytes (`read`: only reading them), log-interpolated
    on the measured curve."""
    curve = ROOF["read_bandwidth_by_working_set" if read else "bandwidth_by_working_set"]
    sizes = [math.log(ws) for ws, _ in curve]
    rates = [gbs for _, gbs in curve]
    return float(np.interp(math.log(max(working_set, 1.0)), sizes, rates))


def bound(flops: float, bytes_: float, working_set: float | None = None,
          read: bool = False) -> tuple[float, float]:
    """(compute-bound seconds, memory-bound seconds) of one phase: only the larger is kept."""
    compute = flops / (CURRENT["peak_gflops"] * 1e9)
    memory = bytes_ / (bandwidth_at(bytes_ if working_set is None else working_set, read) * 1e9)
    return (compute, 0.0) if compute >= memory else (0.0, memory)


def part(seconds: float, flops: float, bytes_: float, *phases) -> tuple:
    """A measured part: (seconds, flops, bytes, compute-bound s, memory-bound s). Without
    `phases` it is one phase; else each phase is (flops, bytes, working set[, read only]) and the
    bounds add (the phases run one after the other, so the part cannot beat their sum)."""
    phases = phases or ((flops, bytes_, bytes_),)
    comp = mem = 0.0
    for f, b, ws, *read in phases:
        c, m = bound(f, b, ws, *read)
        comp, mem = comp + c, mem + m
    return (seconds, flops, bytes_, comp, mem)


# Parts of one transformer block ------------------------------------------------------------------
def block_parts(block, x: torch.Tensor, heads: int, min_seconds: float) -> dict:
    """{part: (seconds, flops, bytes)} for one block's forward on x [B', S, D]."""
    b, s, d = x.shape
    hidden = block.mlp.fc1.out_features
    hd = d // heads
    E = CURRENT["elem"]
    act = b * s * d * E
    h = block.norm1(x)
    qkv = block.attn.qkv(h)
    q, k, v = qkv.reshape(b, s, 3, heads, hd).permute(2, 0, 3, 1, 4)
    native = block.attn.use_native_kernel   # the kernel the model's own forward takes
    attn = attention(q, k, v, native=native)
    merged = attn.transpose(1, 2).reshape(b, s, d)
    g = block.mlp.fc1.rows(block.norm2(x), gelu=True)
    t = lambda fn: median_time(fn, min_seconds=min_seconds, max_calls=50)  # noqa: E731
    return {
        "norm1": part(t(lambda: block.norm1(x)), 8 * b * s * d, 2 * act),
        "qkv": part(t(lambda: block.attn.qkv(h)), 2 * b * s * d * 3 * d, act + 3 * act + 3 * d * d * E),
        "attention": part(t(lambda: attention(q, k, v, native=native)),
                          4 * b * heads * s * s * hd, 4 * act),
        "proj": part(t(lambda: block.attn.proj(merged)), 2 * b * s * d * d, 2 * act + d * d * E),
        "residual adds": part(2 * t(lambda: x + merged), 2 * b * s * d, 2 * 3 * act,
                              *[(b * s * d, 3 * act, 3 * act)] * 2),
        "norm2": part(t(lambda: block.norm2(x)), 8 * b * s * d, 2 * act),
        # GELU is fc1's post-op (Linear.rows(gelu=True), as Mlp runs it): no pass of its own.
        "fc1 + gelu": part(t(lambda: block.mlp.fc1.rows(h, gelu=True)),
                           2 * b * s * d * hidden + 8 * b * s * hidden,
                           act + act * hidden // d + d * hidden * E),
        "fc2": part(t(lambda: block.mlp.fc2(g)), 2 * b * s * hidden * d,
                    act + act * hidden // d + d * hidden * E),
    }


def embed_parts(mar: MAR, rows: int, known_n: int, n_pred: int, min_seconds: float) -> tuple:
    """Seconds, flops, bytes of the embedding, gathers and scatters of one step."""
    c = mar.config
    buf, length, e = c.buffer_size, c.seq_len, c.encoder_embed_dim
    tokens = torch.randn(rows, length, c.token_dim)
    known = torch.arange(known_n).expand(rows, -1)
    predict = torch.arange(known_n, known_n + n_pred).clamp(max=length - 1).expand(rows, -1)
    enc = torch.randn(rows, buf + known_n, e)
    pos = mar.encoder_pos_embed_learned

    def step():
        kr = mar.z_proj(gather_rows(tokens, known)) + gather_rows(pos[:, buf:].expand(rows, -1, -1), known)
        mar.z_proj_ln(kr)
        x = mar.decoder_embed(enc)
        full = mar.mask_token.to(x.dtype).expand(rows, buf + length, x.shape[-1]).clone()
        full.scatter_(1, (known + buf).unsqueeze(-1).expand(-1, -1, x.shape[-1]), x[:, buf:])
        full = full + mar.decoder_pos_embed_learned
        gather_rows(full, predict + buf)

    seconds = median_time(step, min_seconds=min_seconds, max_calls=50)
    d = c.decoder_embed_dim
    flops = 2 * rows * known_n * c.token_dim * e + 2 * rows * (buf + known_n) * e * d
    bytes_ = F32 * rows * (known_n * (c.token_dim + 3 * e) + (buf + known_n) * (e + d)
                           + 3 * (buf + length) * d + n_pred * d)
    return part(seconds, flops, bytes_)


def head_part(model: MARModel, rows: int, min_seconds: float) -> tuple:
    """The backend's head loop on `rows` predicted rows (CFG rows included): seconds, flops, bytes."""
    head = model.head
    w, depth, c, steps = head.width, head.depth, head.token_dim, head.num_steps
    half = rows // 2 if rows > 1 else rows
    z = torch.randn(rows, model.config.decoder_embed_dim)
    x = torch.randn(half, c)
    noise = torch.randn(steps, rows, c)
    scale = torch.full((half,), 3.0) if rows > 1 else None
    temp = torch.ones(half)
    seconds = median_time(lambda: model.backend.head_loop(head, z, x, noise, scale, temp),
                          min_seconds=min_seconds, max_calls=20)
    fc = depth * 2 * w * w + w * c + w * 2 * c   # input_proj, block fc1/fc2, final linear
    ada = (3 * depth + 2) * w * w
    cond = model.config.decoder_embed_dim * w
    flops = 2 * rows * steps * (fc + ada) + 2 * rows * cond
    E = CURRENT["elem"]   # fc / adaLN weights and activations (cond_embed stays float32)
    bytes_ = E * (steps * fc + ada) + F32 * cond
    # Three phases, one after the other: cond_embed once; the adaLN modulations of every step
    # (silu(t_emb + c) @ ada^T; the native loop batches them over a chunk of steps, so they are
    # compute-bound products); per diffusion step the fc products, which re-read their weights
    # (memory-bound at few rows: a read stream), with the activations.
    act = E * rows * w * (4 * depth + 2)
    phases = [(2 * rows * cond, F32 * cond, F32 * cond),
              (2 * rows * steps * ada, E * ada, E * ada),
              (2 * rows * steps * fc, steps * (E * fc + act), E * fc + act, True)]
    return part(seconds, flops, bytes_, *phases)


def ddpm_part(rows: int, token_dim: int, steps: int, min_seconds: float) -> tuple:
    from engine.ops.head import ddpm_update

    x = torch.randn(rows, token_dim)
    eps, v, noise = torch.randn_like(x), torch.randn_like(x), torch.randn_like(x)
    coeffs = torch.rand(7)
    fn = lambda: ddpm_update(x, eps, v, coeffs, noise, 1.0)  # noqa: E731
    seconds = median_time(fn, min_seconds=min_seconds, max_calls=50) * steps
    return part(seconds, 12 * rows * token_dim * steps, 5 * F32 * rows * token_dim * steps,
                *[(12 * rows * token_dim, 5 * F32 * rows * token_dim, 5 * F32 * rows * token_dim)] * steps)


# One case ----------------------------------------------------------------------------------------
def schedule_rows(case: Case, config: MARConfig) -> list[tuple[int, int]]:
    """(known tokens, predicted tokens) of every MAR step."""
    out = []
    for unknown, after, _ in mask_schedule(config.seq_len, case.num_iter):
        out.append((config.seq_len - unknown, unknown - after))
    return out


def interpolate(sampled: dict, steps: int) -> list:
    keys = sorted(sampled)
    return [np.interp(k, keys, [sampled[i] for i in keys]) for k in range(steps)]


def run_case(key: str, case: Case, roof: dict, sampled_steps: int, min_seconds: float,
             end_to_end: bool, log=print) -> dict:
    model = random_model(case)
    mar, c = model.mar, model.config
    bf16 = case.precision == "bf16"
    CURRENT.update(peak_gflops=roof["bf16_gflops" if bf16 else "fp32_gflops"], elem=2 if bf16 else F32)
    rows_per_image = 2 if case.cfg else 1
    rows = case.bsz * rows_per_image
    sched = schedule_rows(case, c)
    picks = sorted({int(k) for k in np.linspace(0, len(sched) - 1, min(sampled_steps, len(sched))).round()})
    parts: dict[str, list] = {}   # name -> [seconds, flops, bytes, compute s, memory s] over the call
    fields = range(5)

    def add(name, *values):
        acc = parts.setdefault(name, [0.0] * 5)
        for i in fields:
            acc[i] += values[i]

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        # Encoder: its length changes every step; decoder: always buffer + every token.
        enc_samples, head_samples, embed_samples = {}, {}, {}
        for k in picks:
            known_n, n_pred = sched[k]
            x = torch.randn(rows, c.buffer_size + known_n, c.encoder_embed_dim)
            enc_samples[k] = block_parts(mar.encoder_blocks[0], x, c.encoder_num_heads, min_seconds)
            head_samples[k] = head_part(model, rows * n_pred, min_seconds)
            embed_samples[k] = embed_parts(mar, rows, known_n, n_pred, min_seconds)
            log(f"  {key}: sampled step {k} (known {known_n}, predicted {n_pred})", flush=True)
        x = torch.randn(rows, c.buffer_size + c.seq_len, c.decoder_embed_dim)
        dec = block_parts(mar.decoder_blocks[0], x, c.decoder_num_heads, min_seconds)
        for name in dec:
            per_step = [interpolate({k: enc_samples[k][name][i] for k in picks}, len(sched)) for i in fields]
            add(f"block {name}", *(sum(p) * c.encoder_depth for p in per_step))
            add(f"block {name}", *(v * c.decoder_depth * len(sched) for v in dec[name]))
        for label, samples in (("embed / gather / scatter", embed_samples), ("head loop", head_samples)):
            per_step = [interpolate({k: samples[k][i] for k in picks}, len(sched)) for i in fields]
            add(label, *(sum(p) for p in per_step))
        ddpm_mean_rows = rows * sum(n for _, n in sched) / len(sched)
        ddpm = ddpm_part(max(1, int(round(ddpm_mean_rows))), c.token_dim, case.diffusion_steps,
                         min_seconds)
        ddpm_total = [v * len(sched) for v in ddpm]

        # Python + dispatch: the same step structure at width 64, end to end, minus its parts.
        probe = random_model(case, width=64)
        probe.set_sampling_steps("1")
        labels = list(range(case.bsz))
        probe.sample_tokens(case.bsz, case.num_iter, 3.0 if case.cfg else 1.0, "linear", labels, 1.0)
        t0 = time.perf_counter()
        probe.sample_tokens(case.bsz, case.num_iter, 3.0 if case.cfg else 1.0, "linear", labels, 1.0)
        probe_call = time.perf_counter() - t0
        probe_compute = 0.0
        for k in (0, len(sched) // 2, len(sched) - 1):
            known_n, n_pred = sched[k]
            xe = torch.randn(rows, c.buffer_size + known_n, 64)
            probe_compute += sum(v[0] for v in block_parts(probe.mar.encoder_blocks[0], xe, 4, min_seconds).values()) \
                * c.encoder_depth / 3 * len(sched)
        xd = torch.randn(rows, c.buffer_size + c.seq_len, 64)
        probe_compute += sum(v[0] for v in block_parts(probe.mar.decoder_blocks[0], xd, 4, min_seconds).values()) \
            * c.decoder_depth * len(sched)
        overhead = max(probe_call - probe_compute, 0.0)
        add("python / dispatch", overhead, 0, 0, 0, 0)

    table = []
    for name, (seconds, flops, bytes_, compute, memory) in parts.items():
        floor_s = compute + memory
        kind = ("compute" if memory <= 0.1 * floor_s else "memory" if compute <= 0.1 * floor_s
                else "compute + memory")
        table.append(dict(part=name, seconds=seconds, gflop=flops / 1e9, gbytes=bytes_ / 1e9,
                          bound_seconds=floor_s, compute_bound_seconds=compute,
                          memory_bound_seconds=memory, bound=kind,
                          fraction=floor_s / seconds if seconds > 0 and floor_s > 0 else None,
                          achieved_gflops=flops / seconds / 1e9 if seconds > 0 else None))
    predicted = sum(r["seconds"] for r in table)
    floor = sum(r["bound_seconds"] for r in table)
    result = dict(case=case.name, key=key, bsz=case.bsz, num_iter=case.num_iter,
                  diffusion_steps=case.diffusion_steps, seq_len=c.seq_len, sampled_steps=picks,
                  parts=table, predicted_seconds=predicted, floor_seconds=floor,
                  ddpm_update=dict(seconds=ddpm_total[0], gflop=ddpm_total[1] / 1e9,
                                   gbytes=ddpm_total[2] / 1e9, bound_seconds=ddpm_total[3] + ddpm_total[4],
                                   note="fused inside the native head loop; reported, not added"),
                  overhead_probe=dict(call_seconds=probe_call, compute_seconds=probe_compute,
                                      per_mar_step_ms=1e3 * overhead / len(sched)))
    if end_to_end:
        labels = list(range(case.bsz))
        t0 = time.perf_counter()
        model.sample_tokens(case.bsz, case.num_iter, 3.0 if case.cfg else 1.0, "linear", labels, 1.0)
        result["measured_seconds"] = time.perf_counter() - t0
        result["measured_over_floor"] = result["measured_seconds"] / floor
    return result


# Output ------------------------------------------------------------------------------------------
def markdown(report: dict) -> str:
    r = report["roofs"]
    s = report["stamp"]
    lines = [f"Roofs: float32 GEMM {r['fp32_gflops']:.0f} GFLOP/s, bf16 GEMM {r['bf16_gflops']:.0f} "
             f"GFLOP/s, read bandwidth {r.get('read_bandwidth_gbs', float('nan')):.1f} GB/s from DRAM, "
             f"copy bandwidth {r['bandwidth_gbs']:.1f} GB/s from DRAM, "
             + ", ".join(f"{gbs:.0f} GB/s at {ws / 2 ** 20:g} MB" for ws, gbs in r["bandwidth_by_working_set"])
             + f" ({s['cpu']}, {s['threads']} threads, "
             f"commit {s['commit'][:10]}, {s['tree']} tree"
             + (f"; starting from the roofs of {report['roofs_from']}" if report.get("roofs_from") else "")
             + ").", ""]
    for case in report["cases"]:
        lines += [f"**{case['case']}** ({case['seq_len']} tokens): predicted {case['predicted_seconds']:.1f} s, "
                  f"floor {case['floor_seconds']:.1f} s"
                  + (f", measured end to end {case['measured_seconds']:.1f} s "
                     f"({case['measured_over_floor']:.2f}x the floor)" if "measured_seconds" in case else "")
                  + f"; Python / dispatch {case['overhead_probe']['per_mar_step_ms']:.1f} ms per MAR step"
                  + (f" (roofs for this case: float32 {case['roofs']['fp32_gflops']:.0f}, bf16 "
                     f"{case['roofs']['bf16_gflops']:.0f} GFLOP/s, DRAM {case['roofs']['bandwidth_gbs']:.1f} GB/s)"
                     if "roofs" in case else "") + ".", "",
                  "| part | GFLOP | GB | measured s | bound s | bound | fraction of roof |",
                  "|---|---|---|---|---|---|---|"]
        for p in sorted(case["parts"], key=lambda p: -p["seconds"]):
            frac = "-" if p["fraction"] is None else f"{p['fraction']:.2f}"
            lines.append(f"| {p['part']} | {p['gflop']:.1f} | {p['gbytes']:.2f} | {p['seconds']:.2f} | "
                         f"{p['bound_seconds']:.2f} | {p['bound']} | {frac} |")
        d = case["ddpm_update"]
        lines += ["", f"DDPM update (torch statement, fused in the native loop): {d['seconds']:.2f} s.", ""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = report["cases"]
    fig, axes = plt.subplots(1, len(cases), figsize=(6 * len(cases), 4.5), squeeze=False)
    for ax, case in zip(axes[0], cases):
        parts = sorted(case["parts"], key=lambda p: -p["seconds"])
        names = [p["part"] for p in parts]
        y = np.arange(len(parts))
        ax.barh(y - 0.2, [p["seconds"] for p in parts], 0.4, label="measured")
        ax.barh(y + 0.2, [p["bound_seconds"] for p in parts], 0.4, label="roofline bound")
        ax.set_yticks(y, names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("seconds per call")
        ax.set_title(case["case"], fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--configs", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--sampled-steps", type=int, default=6)
    parser.add_argument("--min-seconds", type=float, default=0.2)
    parser.add_argument("--end-to-end", nargs="*", default=None, metavar="CASE",
                        help="also time the real call: of the named cases, or of every case when "
                             "none is named (batch 16 at 64 x 100 takes most of an hour on 2 cores)")
    parser.add_argument("--out", default=str(HERE / "results" / "roofline.json"))
    parser.add_argument("--roofs-from", metavar="JSON", default=None,
                        help="an earlier results file of this machine (same CPU and threads): its "
                             "roofs are the starting point, so a run in a slow moment cannot lower "
                             "the standard below what the machine has already shown")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    timed = set() if args.end_to_end is None else set(args.end_to_end or args.configs)
    unknown = timed - set(CASES)
    if unknown:
        parser.error(f"--end-to-end: unknown cases {sorted(unknown)}; choose from {sorted(CASES)}")
    # Roofs are re-measured before every case and only ever raised: each case's bounds use the
    # best the machine has shown so far, so a slow moment cannot lower a floor's standard.
    roof, cases, roofs_from = None, [], None
    if args.roofs_from:
        earlier = json.loads(Path(args.roofs_from).read_text())
        here = machine_stamp()
        if (earlier["stamp"].get("cpu"), earlier["stamp"].get("threads")) != (here["cpu"], args.threads):
            parser.error(f"--roofs-from: {args.roofs_from} was measured on {earlier['stamp'].get('cpu')} "
                         f"with {earlier['stamp'].get('threads')} threads, not this machine's "
                         f"{here['cpu']} with {args.threads}")
        roof = earlier["roofs"]
        roofs_from = f"{Path(args.roofs_from).name} at commit {earlier['stamp'].get('commit', '?')[:10]}"
    for k in args.configs:
        fresh = roofs()
        roof = fresh if roof is None else merge_roofs(roof, fresh)
        ROOF.clear()
        ROOF.update(roof)
        print(f"roofs before {k}: {roof}", flush=True)
        cases.append(dict(run_case(k, CASES[k], roof, args.sampled_steps, args.min_seconds, k in timed),
                          roofs=dict(roof)))
    report = {"stamp": machine_stamp(), "roofs": roof, "cases": cases, "roofs_from": roofs_from,
              "command": "python benchmarks/roofline.py " + " ".join(sys.argv[1:])}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    tmp.replace(out)
    out.with_suffix(".md").write_text(markdown(report) + "\n")
    plot(report, out.with_suffix(".png"))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
