"""GenEval-style report for the text-to-image digits model: is each picture what its prompt asks?

    python -m engine geneval [--checkpoint digits-text] [--per-category 50] [--cfg 1 2 4]
                             [--num-iter 4 8] [--backends reference native] [--prompts-file F]
                             [--out geneval.png] [--json geneval.json]

As GenEval ("GenEval: An Object-Focused Framework for Evaluating Text-to-Image Alignment") does
with an object detector, every image is judged by object-level tests, here on the two 16 x 16
slots of the 16 x 32 canvas:
  * a slot is *empty* when its mean ink ((x + 1) / 2 averaged over the slot) is below
    EMPTY_FRACTION of the faintest real digit's (the 1st percentile over the real train split);
  * a non-empty slot holds the digit the classifier of `engine.builtin.evaluate` (a CNN trained on the
    real train split, 98.9% on held-out digits) assigns to it.
An image is correct when its slots match the prompt's scene (engine.builtin.digits_text.parse_prompt):
  single object   the named digit in one slot (the named side, if any), the other slot empty
  two objects     both digits present, in either order
  counting        both slots hold the digit
  position        the digits on the named sides
The score of a category is the fraction of its images judged correct; the overall score is the
mean over the four categories, as GenEval defines it. Prompts: `per_category` per category drawn
from the grammar with a fixed seed (or your own, one per line, with --prompts-file); image i is
drawn with its own generator seeded seed + i, so every backend sees the same noise.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch

from .digits_text import CATEGORIES, SLOT, Scene, parse_prompt, random_scene
from ..arguments import fast_argument, set_threads
from ..core.errors import EngineError

EMPTY_FRACTION = 0.3


def ink(images: torch.Tensor) -> torch.Tensor:
    """[N, 2] mean ink of the left and right slots of canvases [N, 1, 16, 32] in [-1, 1]."""
    x = (images.float().clamp(-1, 1) + 1) / 2
    return torch.stack([x[..., :SLOT].mean(dim=(1, 2, 3)), x[..., SLOT:].mean(dim=(1, 2, 3))], dim=1)


class Judge:
    """Slot tests: emptiness by ink, identity by the real-digits classifier."""

    def __init__(self, classifier=None, log=None):
        from .digits import load_split
        from .evaluate import load_classifier

        if classifier is None:
            classifier, self.classifier_info = load_classifier(SLOT, log=log)
        else:
            self.classifier_info = {"arch": type(classifier).__name__}
        self.classifier = classifier
        real, _ = load_split("train", SLOT)
        real_ink = ((real + 1) / 2).mean(dim=(1, 2, 3))
        self.faintest_real_ink = float(torch.quantile(real_ink, 0.01))
        self.empty_below = EMPTY_FRACTION * self.faintest_real_ink

    @torch.no_grad()
    def slots(self, images: torch.Tensor) -> list[tuple[int | None, int | None]]:
        """(left, right) of each canvas: the classified digit, or None for an empty slot."""
        from .evaluate import classify

        if images.ndim != 4 or images.shape[1:] != (1, SLOT, 2 * SLOT):
            raise EngineError(f"geneval judges canvases [N, 1, {SLOT}, {2 * SLOT}], got {list(images.shape)}")
        images = images.float().clamp(-1, 1)
        empty = ink(images) < self.empty_below
        halves = torch.cat([images[..., :SLOT], images[..., SLOT:]])
        pred, _ = classify(self.classifier, halves)
        n = len(images)
        return [(None if empty[i, 0] else int(pred[i]), None if empty[i, 1] else int(pred[n + i]))
                for i in range(n)]

    def correct(self, images: torch.Tensor, scenes: list[Scene]) -> list[bool]:
        return [matches(s, slots) for s, slots in zip(scenes, self.slots(images))]


def matches(scene: Scene, slots: tuple[int | None, int | None]) -> bool:
    left, right = slots
    if scene.category == "single object":
        if scene.either:
            return sorted(slots, key=lambda v: v is None) == [scene.either[0], None]
        return (left, right) == (scene.left, scene.right)
    if scene.category == "two objects":
        return left is not None and right is not None and tuple(sorted((left, right))) == scene.either
    return (left, right) == (scene.left, scene.right)   # counting, position


def default_prompts(per_category: int, seed: int = 0) -> list[str]:
    """`per_category` prompts of every category, drawn from the grammar (category-major)."""
    rng = random.Random(seed)
    return [random_scene(rng, category)[1] for category in CATEGORIES for _ in range(per_category)]


def generate_canvases(model, prompts: list[str], cfg: float, num_iter: int, seed: int = 0,
                      batch_size: int = 200, temperature=None, fast="exact") -> torch.Tensor:
    """[N, 1, 16, 32] in [-1, 1]; image i from its own generator seeded seed + i."""
    import engine

    chunks = []
    for k in range(0, len(prompts), batch_size):
        batch = prompts[k:k + batch_size]
        generators = [torch.Generator().manual_seed(seed + k + i) for i in range(len(batch))]
        chunks.append(engine.generate(model, prompts=batch, cfg=cfg, num_iter=num_iter,
                                      temperature=temperature, generator=generators, output_type="pt",
                                      fast=fast))
    return torch.cat(chunks) * 2 - 1


def score(judge: Judge, images: torch.Tensor, prompts: list[str]) -> dict:
    scenes = [parse_prompt(p) for p in prompts]
    ok = judge.correct(images, scenes)
    per_category = {}
    for category in CATEGORIES:
        sel = [o for o, s in zip(ok, scenes) if s.category == category]
        if sel:
            per_category[category] = float(np.mean(sel))
    overall = float(np.mean(list(per_category.values()))) if per_category else float("nan")
    return {"overall": overall, "per_category": per_category, "count": len(prompts)}


def _load(checkpoint, backend, device, precision):
    import engine

    model = engine.load(checkpoint, device=device, backend=backend, precision=precision)
    c = model.config
    if model.conditioning != "text" or c.tokenizer != "pixels" or c.vae_embed_dim != 1 \
            or getattr(model, "text_encoder", None) is None:
        raise EngineError("geneval needs a single-channel pixel text-to-image model with its text "
                          "encoder (such as the built-in 'digits-text')")
    return model


def run_report(checkpoint="digits-text", per_category: int = 50, cfgs=None, num_iters=None,
               backends=None, seed: int = 0, device="cpu", precision="fp32", prompts=None,
               log=print, fast="exact") -> dict:
    from ..backends import available_backends

    backends = list(backends) if backends else available_backends(device)
    first = _load(checkpoint, backends[0], device, precision)
    fast = first.fast_setting(fast)   # refused before sampling when the family lacks it
    defaults = first.sampling_defaults
    cfgs = list(cfgs) if cfgs else [float(defaults.get("cfg", 1.0))]
    num_iters = list(num_iters) if num_iters else [int(defaults.get("num_iter", 8))]
    prompts = list(prompts) if prompts else default_prompts(per_category, seed)
    for p in prompts:
        parse_prompt(p)   # refuse a prompt outside the grammar before sampling anything
    judge = Judge(log=log)
    results = []
    for backend in backends:
        model = first if backend == backends[0] else _load(checkpoint, backend, device, precision)
        label = model.backend_name + ("" if precision == "fp32" else f"-{precision}") \
            + ("" if fast == "exact" else f" fast={fast}")
        for num_iter in num_iters:
            for cfg in cfgs:
                start = time.time()
                images = generate_canvases(model, prompts, float(cfg), int(num_iter), seed, fast=fast)
                r = {"backend": label, "cfg": float(cfg), "num_iter": int(num_iter),
                     **score(judge, images, prompts), "seconds": round(time.time() - start, 2)}
                results.append(r)
                if log:
                    cats = "  ".join(f"{k} {v:.2f}" for k, v in r["per_category"].items())
                    log(f"  {label:>14s}  num_iter {num_iter:3d}  cfg {cfg:4.1f}  overall "
                        f"{r['overall']:.3f}  ({cats})  {r['seconds']:.1f}s")
    return {"checkpoint": str(checkpoint), "per_category": per_category, "seed": seed,
            "precision": precision, "fast": fast, "sampling_defaults": defaults, "prompts": prompts,
            "empty_below_ink": judge.empty_below, "faintest_real_ink": judge.faintest_real_ink,
            "classifier": judge.classifier_info, "results": results}


def format_table(report: dict, markdown: bool = False) -> str:
    head = ["backend", "num_iter", "cfg", "overall", *CATEGORIES, "seconds"]
    rows = [[r["backend"], str(r["num_iter"]), f"{r['cfg']:.1f}", f"{r['overall']:.3f}",
             *[f"{r['per_category'].get(c, float('nan')):.2f}" for c in CATEGORIES], f"{r['seconds']:.1f}"]
            for r in report["results"]]
    from .evaluate import text_table

    return text_table(head, rows, markdown)


def plot_report(report: dict, path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    backends = list(dict.fromkeys(r["backend"] for r in results))
    iters = sorted({r["num_iter"] for r in results})
    fig, axes = plt.subplots(1, 1 + len(CATEGORIES), figsize=(16, 3.6), sharey=True)
    styles, markers = ["-", "--", ":", "-."], ["o", "x", "+", "s"]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, what in zip(axes, ("overall", *CATEGORIES)):
        for bi, backend in enumerate(backends):
            for ii, num_iter in enumerate(iters):
                sel = sorted((r for r in results if r["backend"] == backend and r["num_iter"] == num_iter),
                             key=lambda r: r["cfg"])
                ys = [r["overall"] if what == "overall" else r["per_category"].get(what) for r in sel]
                ax.plot([r["cfg"] for r in sel], ys, color=colors[ii % len(colors)],
                        linestyle=styles[bi % len(styles)], marker=markers[bi % len(markers)],
                        label=f"num_iter {num_iter}" + (f" ({backend})" if len(backends) > 1 else ""))
        ax.set(title=what, xlabel="cfg", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction judged correct")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{report['checkpoint']}: GenEval-style scores, {len(report['prompts'])} prompts, seed {report['seed']}")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _run(args) -> int:
    set_threads(args.threads)
    prompts = None
    if args.prompts_file:
        try:
            prompts = [line.strip() for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
        except OSError as err:
            raise EngineError(f"cannot read --prompts-file {args.prompts_file}: {err.strerror}") from None
        if not prompts:
            raise EngineError(f"--prompts-file {args.prompts_file} holds no prompts")
    if args.per_category < 1:
        raise EngineError(f"--per-category must be positive, got {args.per_category}")
    report = run_report(args.checkpoint, args.per_category, args.cfg, args.num_iter, args.backends,
                        args.seed, args.device, args.precision, prompts, fast=args.fast)
    print()
    print(format_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.json}")
    if args.markdown:
        Path(args.markdown).write_text(format_table(report, markdown=True) + "\n")
        print(f"wrote {args.markdown}")
    if args.out:
        plot_report(report, args.out)
        print(f"wrote {args.out}")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("geneval", help="GenEval-style report of the text-to-image digits model",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="digits-text", help="engine model directory or built-in name")
    p.add_argument("--per-category", type=int, default=50, help="prompts per category (one image each)")
    p.add_argument("--prompts-file", default=None, help="prompts of the grammar, one per line")
    p.add_argument("--cfg", type=float, nargs="+", default=None, help="guidance scales (default: the model's)")
    p.add_argument("--num-iter", type=int, nargs="+", default=None, help="MAR steps (default: the model's)")
    p.add_argument("--backends", nargs="+", default=None, choices=["reference", "native", "triton"],
                   help="default: every backend available on the device")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--fast", type=fast_argument, default="exact",
                   help="approximate sampling mode (docs/fast.md): exact (default), disa, lazy, disa+lazy, "
                        "or a JSON object of their parameters")
    p.add_argument("--out", default=None, help="PNG plot of the scores against cfg")
    p.add_argument("--json", default=None, help="write the full report as JSON")
    p.add_argument("--markdown", default=None, help="write the table as markdown")
    p.set_defaults(func=_run)
    return p
