"""The published MAR sampler and the engine's, side by side on short-sequence configurations.

    MAR=/path/to/LTH14/mar python benchmarks/vs_published.py --rounds 2 \
        [--published-python /env/with/timm/bin/python] --out benchmarks/results/vs_published.json

Every configuration has MAR-B's diffusion head (6 x 1024); the transformer is MAR-B's (12 + 12
blocks of width 768) or a smaller one, over 64 or 16 tokens (128 / 64 px, VAE stride 16) with
MAR's buffer of 64, class labels, cfg 3 (linear), batch 1. The published code (its `MAR` with
random weights of sensible scales, saved in its checkpoint format) and `engine.load(checkpoint,
backend=...)` run in fresh processes, alternating (published, engine, published, engine, ...), so
a machine whose speed drifts cannot favour either; each process makes one untimed warm-up call
(num_iter 2) and then the timed call after torch.manual_seed(1) / np.random.seed(1). The
engine's tokens are compared with the published ones (relative error, must be <= 1e-4 in
float32). The published code needs timm; torchvision, which timm imports for parts MAR never
uses, is stood in for when it is missing (as in bench_fluid.py).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from stamp import machine_stamp  # noqa: E402

MAR_B = dict(vae_stride=16, patch_size=1, vae_embed_dim=16, encoder_embed_dim=768, encoder_depth=12,
             encoder_num_heads=12, decoder_embed_dim=768, decoder_depth=12, decoder_num_heads=12,
             buffer_size=64, class_num=1000, diffloss_d=6, diffloss_w=1024)
SMALL = dict(encoder_embed_dim=384, encoder_depth=6, encoder_num_heads=6, decoder_embed_dim=384,
             decoder_depth=6, decoder_num_heads=6)
# name: (published MAR constructor arguments, sample_tokens settings)
CONFIGS = {
    "MAR-B, 64 tokens, 16 x 100": (dict(MAR_B, img_size=128, num_sampling_steps="100"),
                                   dict(bsz=1, num_iter=16, cfg=3.0)),
    "MAR-B, 64 tokens, 16 x 50": (dict(MAR_B, img_size=128, num_sampling_steps="50"),
                                  dict(bsz=1, num_iter=16, cfg=3.0)),
    "MAR-B, 16 tokens, 8 x 100": (dict(MAR_B, img_size=64, num_sampling_steps="100"),
                                  dict(bsz=1, num_iter=8, cfg=3.0)),
    "384-wide 6+6 transformer, MAR-B head, 64 tokens, 16 x 100": (
        dict(MAR_B, **SMALL, img_size=128, num_sampling_steps="100"), dict(bsz=1, num_iter=16, cfg=3.0)),
}
MAX_REL_ERR = 1e-4

# One process: load, warm up, time one call, save the tokens. argv: side, checkpoint, json spec.
CHILD = r'''
import argparse, json, sys, time
import numpy as np, torch
side, ckpt, spec = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
run = spec["run"]
if side == "published":
    sys.path.insert(0, spec["bench_dir"])
    from published_env import torchvision_standin
    torch.Tensor.cuda = lambda self, *a, **k: self
    torchvision_standin()
    sys.path.insert(0, spec["mar_repo"])
    import functools, os
    import torch.nn as nn
    from models.mar import MAR  # the published code
    model = MAR(norm_layer=functools.partial(nn.LayerNorm, eps=1e-6), mlp_ratio=4, **spec["config"]).eval()
    if not os.path.exists(ckpt):  # random weights of sensible scales, in the published format
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) / max(p.shape[-1], 1) ** 0.5 if p.dim() > 1
                        else 1 + 0.1 * torch.randn(p.shape, generator=gen))
        torch.save({"model_ema": model.state_dict(), "epoch": 0,
                    "args": argparse.Namespace(model="custom", **spec["config"])}, ckpt)
    model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=False)["model_ema"])
    labels = torch.arange(run["bsz"]) % spec["config"]["class_num"]
else:
    import engine
    model = engine.load(ckpt, backend=side)
    labels = [i % spec["config"]["class_num"] for i in range(run["bsz"])]
call = lambda num_iter: model.sample_tokens(run["bsz"], num_iter, run["cfg"], "linear", labels, 1.0)
with torch.no_grad():
    call(2)  # warm-up: first-use costs (MKL / oneDNN set-up, the engine's packing)
    torch.manual_seed(1); np.random.seed(1)
    t0 = time.perf_counter(); tokens = call(run["num_iter"]); seconds = time.perf_counter() - t0
torch.save(tokens.float().contiguous(), spec["tokens_out"])
print(json.dumps({"seconds": seconds, "threads": torch.get_num_threads()}))
'''


def run_child(python: str, side: str, ckpt: Path, spec: dict) -> dict:
    proc = subprocess.run([python, "-c", CHILD, side, str(ckpt), json.dumps(spec)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{side} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mar-repo", default=os.environ.get("MAR"), help="checkout of LTH14/mar (or $MAR)")
    parser.add_argument("--published-python", default=sys.executable,
                        help="python of an environment with torch and timm (default: this one)")
    parser.add_argument("--backend", default="native")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--only", nargs="*", help="configuration names (default: all)")
    parser.add_argument("--out", default=str(HERE / "results" / "vs_published.json"))
    args = parser.parse_args()
    if not args.mar_repo or not (Path(args.mar_repo) / "models" / "mar.py").exists():
        raise SystemExit("set --mar-repo (or MAR) to a checkout of the published MAR code")
    import torch

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for k, (name, (config, run)) in enumerate(CONFIGS.items()):
            if args.only and name not in args.only:
                continue
            ckpt = Path(tmp) / f"ck_{k}.pth"
            spec = dict(config=config, run=run, mar_repo=str(Path(args.mar_repo).resolve()),
                        bench_dir=str(HERE))
            times = {"published": [], args.backend: []}
            err = None
            for r in range(args.rounds):
                for side, python in (("published", args.published_python), (args.backend, sys.executable)):
                    out = Path(tmp) / f"tokens_{k}_{side}.pt"
                    times[side].append(run_child(python, side, ckpt, dict(spec, tokens_out=str(out)))["seconds"])
                pub = torch.load(Path(tmp) / f"tokens_{k}_published.pt")
                got = torch.load(Path(tmp) / f"tokens_{k}_{args.backend}.pt")
                err = max(err or 0.0, float((got - pub).norm() / pub.norm()))
            pairs = [p / e for p, e in zip(times["published"], times[args.backend])]
            row = dict(name=name, config=config, run=run, published_s=times["published"],
                       engine_s=times[args.backend], speedup_per_round=pairs,
                       speedup_median=statistics.median(pairs), rel_err_vs_published=err)
            results.append(row)
            print(f"{name}: published {statistics.median(times['published']):.1f} s, "
                  f"{args.backend} {statistics.median(times[args.backend]):.1f} s, "
                  f"{row['speedup_median']:.2f}x (rounds {', '.join(f'{p:.2f}' for p in pairs)}), "
                  f"rel err {err:.1e}", flush=True)
            if err > MAX_REL_ERR:
                raise SystemExit(f"{name}: tokens differ from the published ones ({err:.2e} > {MAX_REL_ERR})")
    Path(args.out).write_text(json.dumps(dict(stamp=machine_stamp(), backend=args.backend,
                                              rounds=args.rounds, results=results), indent=1) + "\n")


if __name__ == "__main__":
    main()
