"""Compile every Triton kernel ahead of time for sm_80 / sm_90 (no GPU needed) and report
registers, spills and shared memory per kernel variant.

    python -m engine.kernels.aot_report            # markdown table
    python -m engine.kernels.aot_report --json     # machine-readable (used by the tests)

Each variant uses the launch config the launchers pick on a GPU (132 SMs) for a representative
MAR head shape (MAR-L: width 1280, token dim 16, 8 tokens = 16 rows with CFG; the ResBlock
also at 1024 rows, where it takes its largest row tiles). `compiled.n_regs` and
`n_spills` are only filled in by a GPU driver, so they are read from the cubin with the
`cuobjdump` that ships with Triton's ptxas: REG, and LOCAL / 4 as spills (what the driver
reports as n_spills: CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES / 4).
The kernels must not have been imported in interpreter mode (TRITON_INTERPRET=1): `collect`
runs the compilation in a fresh process without it when needed.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

ARCHS = (80, 90)
WIDTH, TOKEN_DIM, TOKENS, DEPTH, SMS = 1280, 16, 8, 8, 132
FLOAT_ARGS = {"eps", "clip_lo", "clip_hi", "top_p"}   # cfg_ptr / temp_ptr: per-row fp32 pointers
WEIGHT_ARGS = {"w_ptr", "w1_ptr", "w2_ptr", "logits_ptr"}
POINTER_TYPES = {"cnt_ptr": "*i32", "idx_ptr": "*i64", "ok_ptr": "*i1"}   # other pointers: fp32


@dataclass
class Resources:
    kernel: str
    variant: str
    arch: int
    num_warps: int
    n_regs: int
    n_spills: int
    shared: int


def _variants():
    """(kernel name, variant label, jit function, constexprs, num_warps, fp fusion, weight dtype)."""
    from . import categorical_sample as cs, ddpm_update as dd, head_block as hb, linear_epilogue as le
    from . import modulated_layernorm as ml

    W, C, n = WIDTH, TOKEN_DIM, TOKENS
    M = 2 * n   # rows with CFG
    out = []
    for label, pro, row, epi, wdt in (("adaln fp32", le.PRO_SILU, True, le.EPI_BIAS, "fp32"),
                                      ("adaln bf16", le.PRO_SILU, True, le.EPI_BIAS, "bf16"),
                                      ("gate+res fp32", le.PRO_NONE, False, le.EPI_GATE_RES, "fp32")):
        cfg = le.linear_config(M, (3 * DEPTH + 2) * W, W)
        nw = cfg.pop("num_warps")
        prec = "ieee" if wdt == "fp32" else "tf32"
        out.append(("linear_epilogue", label, le._linear_kernel,
                    dict(PROLOGUE=pro, HAS_ROW=row, EPILOGUE=epi, PRECISION=prec, **cfg), nw, True, wdt))
    cfg = ml.modln_config(M, W)
    nw = cfg.pop("num_warps")
    out.append(("modulated_layernorm", "affine", ml._modln_kernel, dict(AFFINE=True, **cfg), nw,
                False, "fp32"))
    cfg = dd.ddpm_config(n, C)
    nw = cfg.pop("num_warps")
    out.append(("ddpm_update", "cfg+clip", dd._ddpm_kernel, dict(HAS_CFG=True, HAS_CLIP=True, **cfg),
                nw, False, "fp32"))
    for rows, wdt in ((M, "fp32"), (M, "bf16"), (1024, "bf16")):
        cfg = hb.gpu_resblock_config(rows, W, SMS)
        nw = cfg.pop("num_warps")
        split, hid_per = hb.split_plan(W, cfg["BJ"], cfg.pop("SPLIT"))
        prec = "ieee" if wdt == "fp32" else "tf32"
        out.append(("resblock", f"{rows} rows split={split} {wdt}", hb._resblock_kernel,
                    dict(SPLIT=split, HID_PER=hid_per, PRECISION=prec, **cfg), nw, True, wdt))
    for wdt in ("fp32", "bf16"):
        cfg = hb.final_config(n, W, C)
        nw = cfg.pop("num_warps")
        prec = "ieee" if wdt == "fp32" else "tf32"
        out.append(("final_ddpm", f"cfg+clip {wdt}", hb._final_kernel,
                    dict(HAS_CFG=True, HAS_CLIP=True, PRECISION=prec, **cfg), nw, False, wdt))
    # One ELM decode step (2 sub-tokens x batch 8, CFG): code_dim 10 with top-k (ELM's
    # sampling), code_dim 16 with top-k + top-p and bf16 logits (the largest tiles).
    for vocab, top_p, wdt in ((1024, False, "fp32"), (65536, True, "bf16")):
        cfg = cs.categorical_config(2 * 8, vocab)
        nw = cfg.pop("num_warps")
        out.append(("categorical_sample", f"V={vocab} top-k{'+top-p' if top_p else ''} {wdt}",
                    cs._categorical_kernel, dict(HAS_CFG=True, RECIP_TEMP=True, HAS_TOP_K=True,
                                                 HAS_TOP_P=top_p, WRITE_LOGITS=True, **cfg),
                    nw, False, wdt))
    return out


def _signature(fn, constexprs, weight_dtype):
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*" + weight_dtype if name in WEIGHT_ARGS else POINTER_TYPES.get(name, "*fp32")
            attrs[(i,)] = [["tt.divisibility", 16]]   # torch allocations are 16-byte aligned
        elif name in FLOAT_ARGS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if name.startswith("stride") or name in ("W", "K", "N"):
                attrs[(i,)] = [["tt.divisibility", 16]]   # head widths are multiples of 16
    return sig, attrs


def _cuobjdump() -> str:
    from triton import knobs

    return knobs.nvidia.cuobjdump.path   # bundled with the wheel; TRITON_CUOBJDUMP_PATH overrides


def compile_variant(fn, constexprs, num_warps, fp_fusion, weight_dtype, arch):
    """triton.compile for a CUDA target; returns the CompiledKernel with n_regs/n_spills set."""
    import triton
    from triton.backends.compiler import GPUTarget

    sig, attrs = _signature(fn, constexprs, weight_dtype)
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "enable_fp_fusion": fp_fusion})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        dump = subprocess.run([_cuobjdump(), "-res-usage", f.name], check=True,
                              capture_output=True, text=True).stdout
    usage = dict(re.findall(r"(REG|LOCAL|SHARED|STACK):(\d+)", dump))
    compiled.n_regs = int(usage["REG"])
    compiled.n_spills = int(usage["LOCAL"]) // 4
    return compiled


def _one(job) -> Resources:
    index, arch = job
    kernel, label, fn, constexprs, nw, fusion, wdt = _variants()[index]
    c = compile_variant(fn, constexprs, nw, fusion, wdt, arch)
    return Resources(kernel, label, arch, nw, c.n_regs, c.n_spills, c.metadata.shared)


def report(archs=ARCHS, jobs: int | None = None) -> list[Resources]:
    """Compile all variants for all archs (in `jobs` worker processes: compiles are CPU-bound)."""
    todo = [(i, arch) for i in range(len(_variants())) for arch in archs]
    jobs = jobs or min(4, os.cpu_count() or 1)
    if jobs <= 1:
        return [_one(job) for job in todo]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_one, todo))


def collect(archs=ARCHS) -> list[Resources]:
    """report(), in a subprocess without TRITON_INTERPRET when this process interprets."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return report(archs)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "engine.kernels.aot_report", "--json",
           "--arch", ",".join(str(a) for a in archs)]
    done = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    return [Resources(**r) for r in json.loads(done.stdout)]


def markdown(rows: list[Resources]) -> str:
    lines = ["| kernel | variant | arch | warps | registers | spills | shared (B) |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r.kernel} | {r.variant} | sm_{r.arch} | {r.num_warps} | {r.n_regs} | "
              f"{r.n_spills} | {r.shared} |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    parser.add_argument("--arch", default=",".join(map(str, ARCHS)), help="e.g. 80,90")
    parser.add_argument("--out", default=None, help="also write the rows with the machine stamp to "
                        "this JSON file (from a source checkout: benchmarks/results/aot.json)")
    args = parser.parse_args(argv)
    rows = collect(tuple(int(a) for a in args.arch.split(",")))
    if args.out:
        from pathlib import Path

        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
        from stamp import machine_stamp

        Path(args.out).write_text(json.dumps({
            "stamp": machine_stamp(), "command": "python -m engine.kernels.aot_report --out " + args.out,
            "kernels": [asdict(r) for r in rows]}, indent=1) + "\n")
    print(json.dumps([asdict(r) for r in rows]) if args.json else markdown(rows))
    return 1 if any(r.n_spills for r in rows) and not args.json else 0


if __name__ == "__main__":
    sys.exit(main())
