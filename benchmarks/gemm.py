"""The GEMM paths the engine can use on CPU, side by side, and this machine's limits.

    python benchmarks/gemm.py [--threads 1 2] [--out benchmarks/results/gemm.json]

For each product M x N x K (activations [M, K] times a weight [N, K], the head and transformer
shapes of MAR-B) and each thread count: F.linear (MKL sgemm), MKL packed weights
(torch.ops.mkl._mkl_linear), oneDNN with the weight reordered once (torch.ops.mkldnn, what the
native backend and the transformer's packed linears use), and oneDNN with bf16 weights and
activations (where this CPU's oneDNN has bf16 kernels; else "widened_bf16", the bf16 product the
engine runs there: oneDNN's float32 product of the bf16 values, rounded to bf16). Also the
float32 / bf16 GEMM peak (best GFLOP/s over large products) and the streaming memory bandwidth
(a large copy), the two roofs of benchmarks/README.md. Times are the median of repeated calls
after a warm-up; the results file carries the machine stamp.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stamp import machine_stamp  # noqa: E402

from engine.ops import packed_linear  # noqa: E402

SHAPES = [(8, 1024, 1024), (8, 3072, 1024), (64, 1024, 1024), (512, 1024, 1024),
          (200, 20480, 1024), (512, 20480, 1024),
          # transformer products of MAR-B at batch 1 with CFG: qkv / fc1 / fc2 over 2 x 320 rows
          (640, 2304, 768), (640, 3072, 768), (640, 768, 3072)]
PEAK_SHAPES = [(1024, 1024, 1024), (2048, 2048, 2048), (640, 3072, 768)]


def median_time(fn, min_seconds: float = 0.3, max_calls: int = 200) -> float:
    fn()
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < min_seconds and len(times) < max_calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def methods(m: int, n: int, k: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=gen)
    w = torch.randn(n, k, generator=gen) / k ** 0.5
    b = torch.zeros(n)
    out = {"aten_mkl": lambda: F.linear(x, w, b)}
    if hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight") and torch.backends.mkl.is_available():
        packed = torch.ops.mkl._mkl_reorder_linear_weight(w, m)
        out["mkl_packed"] = lambda: torch.ops.mkl._mkl_linear(x, packed, w, b, m)
    if packed_linear.onednn_available():
        reordered = torch.ops.mkldnn._reorder_linear_weight(w, None)
        out["onednn"] = lambda: torch.ops.mkldnn._linear_pointwise(x, reordered, b, "none", [], "")
        xb = x.bfloat16()
        # this CPU's bf16 product: oneDNN's bf16 kernels, or widened where it has none
        kind, packed_bf16, bias_bf16 = packed_linear.pack(w, b, torch.bfloat16)
        name = "onednn_bf16" if kind == "onednn" else "widened_bf16"
        out[name] = lambda: packed_linear.run(kind, xb, packed_bf16, bias_bf16)
    return out


BF16_METHODS = ("onednn_bf16", "widened_bf16")


def bandwidth_gbs(mbytes: int = 512) -> float:
    """Streaming copy of a buffer far larger than the caches: bytes read + written per second."""
    src = torch.ones(mbytes * 2 ** 20 // 4)
    dst = torch.empty_like(src)
    t = median_time(lambda: dst.copy_(src), min_seconds=1.0, max_calls=20)
    return 2 * src.numel() * 4 / t / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, torch.get_num_threads()])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "gemm.json"))
    args = parser.parse_args()
    default_threads = torch.get_num_threads()
    rows, peaks, bandwidth = [], {}, {}
    for threads in dict.fromkeys(args.threads):
        torch.set_num_threads(threads)
        for m, n, k in SHAPES:
            for name, fn in methods(m, n, k).items():
                t = median_time(fn)
                rows.append(dict(threads=threads, m=m, n=n, k=k, method=name, seconds=t,
                                 gflops=2 * m * n * k / t / 1e9))
                print(f"threads={threads} {m}x{n}x{k} {name:12s} {t * 1e6:10.1f} us "
                      f"{rows[-1]['gflops']:7.1f} GFLOP/s", flush=True)
        for name in ("aten_mkl", "onednn", *BF16_METHODS):
            best = 0.0
            for m, n, k in PEAK_SHAPES:
                fn = methods(m, n, k).get(name)
                if fn is not None:
                    best = max(best, 2 * m * n * k / median_time(fn) / 1e9)
            peaks.setdefault(str(threads), {})[name] = best
        bandwidth[str(threads)] = bandwidth_gbs()
        print(f"threads={threads} peaks {peaks[str(threads)]} bandwidth {bandwidth[str(threads)]:.1f} GB/s")
    torch.set_num_threads(default_threads)
    result = {"stamp": machine_stamp(), "peak_gflops": peaks, "copy_bandwidth_gbs": bandwidth,
              "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.out + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(args.out)


if __name__ == "__main__":
    main()
