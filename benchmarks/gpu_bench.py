"""GPU latency of `sample_tokens` for MAR-B/L/H shapes with random weights.

    python benchmarks/gpu_bench.py                       # on a CUDA machine: the full table
    python benchmarks/gpu_bench.py --dry                 # anywhere: tiny shapes, CPU, 1 repeat

Compares the published-style eager loop (backend "reference", no graphs) with the engine's
Triton backend eagerly and replayed as CUDA graphs. Times with CUDA events after a warm-up call
(which also captures the graphs); prints a markdown table, optionally writes JSON."""
from __future__ import annotations

import argparse
import json
import time

import torch

from engine.core.config import MARConfig, PRESETS
from engine.families.mar import MARModel
from engine.models.mar import MAR

MODELS = {"mar_base": "mar_base", "mar_large": "mar_large", "mar_huge": "mar_huge"}
TINY = dict(img_size=64, encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=2,
            decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, diffloss_d=1,
            diffloss_w=32, buffer_size=4, class_num=10)


def random_model(preset: str, steps: str, device, dry: bool) -> MAR:
    config = MARConfig(**TINY, num_sampling_steps=steps) if dry else \
        MARConfig.from_preset(preset, num_sampling_steps=steps)
    torch.manual_seed(0)
    with torch.device(device):
        mar = MAR(config)
    with torch.no_grad():
        for p in mar.parameters():
            p.normal_(0, 0.02)
    return mar.eval()


def variants(device):
    if device.type == "cuda":
        return [("published-style eager", "reference", False), ("engine triton", "triton", False),
                ("engine triton + graphs", "triton", True)]
    return [("published-style eager", "reference", False), ("engine auto", "auto", False)]


def time_call(fn, device, repeats: int) -> float:
    """Median seconds per call."""
    fn()  # warm-up: compiles kernels, captures graphs
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def run(models, batch_sizes, num_iter, steps, cfg, repeats, device, dry) -> list[dict]:
    rows = []
    for preset in models:
        mar = random_model(preset, steps, device, dry)
        for bsz in batch_sizes:
            labels = torch.arange(bsz) % mar.config.class_num
            for label, backend, graphs in variants(device):
                model = MARModel(mar, backend=backend, cuda_graphs=graphs)
                gen = torch.Generator(device=device).manual_seed(0)

                def call():
                    return model.sample_tokens(bsz, num_iter=num_iter, cfg=cfg, labels=labels,
                                               generator=gen)
                seconds = time_call(call, device, repeats)
                rows.append(dict(model=preset, batch=bsz, variant=label, backend=model.backend_name,
                                 seconds=seconds, images_per_s=bsz / seconds))
    return rows


def table(rows) -> str:
    out = ["| model | batch | variant | s / call | images / s | vs eager |", "|---|---|---|---|---|---|"]
    base = {}
    for r in rows:
        key = (r["model"], r["batch"])
        base.setdefault(key, r["seconds"])
        out.append(f"| {r['model']} | {r['batch']} | {r['variant']} | {r['seconds']:.3f} | "
                   f"{r['images_per_s']:.2f} | {base[key] / r['seconds']:.2f}x |")
    return "\n".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 256])
    parser.add_argument("--num-iter", type=int, default=64)
    parser.add_argument("--steps", default="100", help="diffusion respacing")
    parser.add_argument("--cfg", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dry", action="store_true", help="tiny shapes on CPU, to check the script")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.dry:
        device = torch.device("cpu")
        args.models, args.batch_sizes, args.num_iter, args.steps, args.repeats = \
            args.models[:1], [1, 2], 4, "5", 1
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        parser.error("no CUDA device: run with --dry to check the script on CPU")
    rows = run(args.models, args.batch_sizes, args.num_iter, args.steps, args.cfg, args.repeats,
               device, args.dry)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
