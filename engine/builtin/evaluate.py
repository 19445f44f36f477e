"""Quality report for digit models: classifier accuracy and Fréchet distance of generated digits.

    python -m engine evaluate [--checkpoint digits] [--samples-per-class 50] [--cfg 1 2 4]
                              [--num-iter 16] [--backends reference native] [--out report.png]
                              [--json report.json]

A small CNN is trained on the real *train* split of the scikit-learn digits (at the model's
resolution; cached under ~/.cache/engine, or $ENGINE_CACHE_DIR) and its accuracy on the real
*held-out* split is reported. For every (backend, cfg, num_iter) of the sweep the model draws
N samples per class from one fixed generator seed, and the report gives
  (a) the fraction of samples the classifier assigns to the requested class, overall and per class;
  (b) the Fréchet distance between the classifier's penultimate features of the samples and of
      the held-out real digits, next to the real-vs-real floor: the same distance for N real
      *train* digits per class against the same held-out digits.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .digits import NUM_CLASSES, load_split, per_class_subset
from ..arguments import fast_argument, set_threads
from ..core.errors import EngineError

CLASSIFIER_VERSION = 2  # 2: always trained on one thread (v1 depended on the thread count)
FEATURE_DIM = 64


# The classifier ------------------------------------------------------------------------------
class DigitClassifier(nn.Module):
    """conv-conv-pool-conv-pool, a 64-d feature layer (its ReLU output is the feature space of
    the Fréchet distance), then the class logits. Input [N, 1, S, S] in [-1, 1], S divisible by 4."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1)
        self.fc = nn.Linear(32 * (size // 4) ** 2, FEATURE_DIM)
        self.out = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)
        return F.relu(self.fc(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(x))


def _shift(x: torch.Tensor, gen: torch.Generator, max_shift: int) -> torch.Tensor:
    """Random translations by up to max_shift pixels (zero-padded at the background value -1)."""
    if max_shift == 0:
        return x
    n, _, h, w = x.shape
    pad = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None])[:, None, :, None].expand(n, 1, h, w + 2 * max_shift)
    out = torch.gather(pad, 2, rows)
    cols = (dx[:, None] + torch.arange(w)[None])[:, None, None, :].expand(n, 1, h, w)
    return torch.gather(out, 3, cols)


def train_classifier(size: int, epochs: int = 30, seed: int = 0, log=None) -> DigitClassifier:
    """Train on the real train split (random 1-pixel shifts per 8 pixels of resolution), seed-fixed."""
    if size % 4:
        raise EngineError(f"the digit classifier needs a size divisible by 4, got {size}")
    images, labels = load_split("train", size)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same classifier, bit for bit, whatever the caller's threads
    try:
        return _train_classifier(images, labels, size, epochs, seed, log)
    finally:
        torch.set_num_threads(threads)


def _train_classifier(images, labels, size: int, epochs: int, seed: int, log) -> DigitClassifier:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    clf = DigitClassifier(size)
    opt = torch.optim.AdamW(clf.parameters(), lr=2e-3, weight_decay=1e-4)
    steps_per_epoch = (len(images) + 63) // 64
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=epochs * steps_per_epoch)
    max_shift = max(1, size // 8)
    clf.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(images), generator=gen)
        for k in range(0, len(images), 64):
            idx = perm[k:k + 64]
            loss = F.cross_entropy(clf(_shift(images[idx], gen, max_shift)), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if log:
            log(f"classifier epoch {epoch + 1}/{epochs} loss {loss.item():.4f}")
    return clf.eval().requires_grad_(False)


def cache_dir() -> Path:
    from ..native.build import cache_root

    return cache_root()  # one cache for the package ($ENGINE_CACHE_DIR, else the user cache)


def load_classifier(size: int, cache: bool = True, log=None) -> tuple[DigitClassifier, dict]:
    """(classifier, info) for images of `size`; info has its held-out accuracy. Trained once
    and cached (a few seconds on CPU)."""
    path = cache_dir() / f"digits_classifier_{size}px_v{CLASSIFIER_VERSION}.pt"
    clf, info = None, None
    if cache and path.exists():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            clf = DigitClassifier(size)
            clf.load_state_dict(saved["state"])
            clf.eval().requires_grad_(False)
            info = json.loads(saved["info"])
        except Exception:  # a stale or corrupt cache entry: retrain
            clf = None
    if clf is None:
        start = time.time()
        clf = train_classifier(size, log=log)
        held_x, held_y = load_split("heldout", size)
        pred, _ = classify(clf, held_x)
        info = {"size": size, "version": CLASSIFIER_VERSION, "heldout_accuracy": float((pred == held_y).float().mean()),
                "heldout_count": len(held_y), "train_seconds": round(time.time() - start, 1),
                "arch": "CNN 16-32-32 conv, 64-d features", "train_threads": 1}
        if cache:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".tmp{os.getpid()}")
                torch.save({"state": clf.state_dict(), "info": json.dumps(info)}, tmp)
                os.replace(tmp, path)
            except OSError:  # read-only home: use it uncached
                pass
    return clf, info


# Metrics -------------------------------------------------------------------------------------
def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of two feature sets [n, d]."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.linalg.eigvalsh(root_a @ s_b @ root_a)
    tr_sqrt = np.sqrt(np.clip(cross, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * tr_sqrt)


@torch.no_grad()
def classify(clf: DigitClassifier, images: torch.Tensor, batch: int = 512):
    """(predicted labels [N], features [N, 64]) of images [N, 1, S, S] in [-1, 1]."""
    preds, feats = [], []
    for k in range(0, len(images), batch):
        f = clf.features(images[k:k + batch].float())
        feats.append(f)
        preds.append(clf.out(f).argmax(1))
    return torch.cat(preds), torch.cat(feats).numpy()


def accuracy_report(pred: torch.Tensor, labels: torch.Tensor) -> tuple[float, list[float]]:
    per_class = []
    for c in range(NUM_CLASSES):
        sel = labels == c
        per_class.append(float((pred[sel] == c).float().mean()) if sel.any() else float("nan"))
    return float((pred == labels).float().mean()), per_class


@dataclass
class Reference:
    """What every sweep entry is compared with."""
    size: int
    clf: DigitClassifier
    classifier_info: dict
    heldout_features: np.ndarray
    samples_per_class: int
    real_vs_real_fd: float = 0.0
    real_vs_real_accuracy: float = 0.0
    floor_count: int = 0


def make_reference(size: int, samples_per_class: int, seed: int = 0, log=None) -> Reference:
    clf, info = load_classifier(size, log=log)
    held_x, _ = load_split("heldout", size)
    _, held_feats = classify(clf, held_x)
    train_x, train_y = load_split("train", size)
    idx = per_class_subset(train_y, samples_per_class, seed=seed)
    pred, feats = classify(clf, train_x[idx])
    ref = Reference(size, clf, info, held_feats, samples_per_class)
    ref.real_vs_real_fd = frechet_distance(feats, held_feats)
    ref.real_vs_real_accuracy = accuracy_report(pred, train_y[idx])[0]
    ref.floor_count = len(idx)
    return ref


@dataclass
class SweepResult:
    backend: str
    cfg: float
    num_iter: int
    temperature: float
    accuracy: float
    per_class: list = field(default_factory=list)
    fd: float = 0.0
    seconds: float = 0.0
    count: int = 0
    fast: object = "exact"      # the fast= mode sampled with (engine.core.fast; a name or a dict)


def generate_digits(model, samples_per_class: int, cfg: float, num_iter: int, temperature: float = 1.0,
                    seed: int = 0, batch_size: int = 250, classes=None, fast="exact") -> tuple[torch.Tensor, torch.Tensor]:
    """(images [N, 1, S, S] in [-1, 1], labels [N]): `samples_per_class` of every class, class-major,
    drawn in fixed batches from one generator seeded with `seed`."""
    classes = list(range(NUM_CLASSES)) if classes is None else list(classes)
    labels = [c for c in classes for _ in range(samples_per_class)]
    generator = torch.Generator(device="cpu").manual_seed(seed)
    chunks = []
    for k in range(0, len(labels), batch_size):
        batch = labels[k:k + batch_size]
        if getattr(model, "bae", None) is not None:   # BAE-token models: images in [0, 1] from their BAE
            import engine
            chunks.append(engine.generate(model, batch, num_iter=num_iter, cfg=cfg, temperature=temperature,
                                          generator=generator, output_type="pt", fast=fast) * 2 - 1)
            continue
        chunks.append(model.sample_tokens(len(batch), num_iter=num_iter, cfg=cfg, labels=batch,
                                          temperature=temperature, generator=generator, fast=fast).float().cpu())
    return torch.cat(chunks).clamp(-1, 1), torch.tensor(labels)


def evaluate_samples(ref: Reference, images: torch.Tensor, labels: torch.Tensor) -> dict:
    pred, feats = classify(ref.clf, images)
    acc, per_class = accuracy_report(pred, labels)
    return {"accuracy": acc, "per_class": per_class, "fd": frechet_distance(feats, ref.heldout_features)}


def _load_model(checkpoint, backend: str, device: str, precision: str = "fp32"):
    import engine

    model = engine.load(checkpoint, device=device, backend=backend, precision=precision)
    if getattr(model, "bae", None) is not None:   # a BAE-token model that ships its decoder (digits-elm-ar)
        if model.num_classes < NUM_CLASSES:
            raise EngineError(f"evaluate needs classes 0-9; this model has {model.num_classes}")
        return model
    if model.conditioning != "class" or model.decoder != "pixels" or model.image_shape()[2] != 1 \
            or model.num_classes < NUM_CLASSES:
        raise EngineError("evaluate needs a class-conditional single-channel pixel model with "
                          "classes 0-9 (such as the built-in 'digits')")
    return model


def run_sweep(checkpoint="digits", samples_per_class: int = 20, cfgs=(1.0, 2.0, 4.0), num_iters=None,
              backends=None, temperature=None, seed: int = 0, device: str = "cpu", log=print,
              precision: str = "fp32", fast="exact") -> dict:
    """Every (backend, cfg, num_iter); returns the report dict (also what --json writes).
    With a reduced `precision` the backends are labelled e.g. "native-bf16"."""
    from ..backends import available_backends

    first = _load_model(checkpoint, backends[0] if backends else "auto", device, precision)
    if not backends:   # the head backends, for models with a diffusion head; the others sample in PyTorch
        backends = available_backends(device) if hasattr(first, "head") else [first.backend_name]
        first = _load_model(checkpoint, backends[0], device, precision)
    backends = list(backends)
    fast = first.fast_setting(fast)   # refused here, before any sampling, when the family lacks it
    defaults = first.sampling_defaults
    num_iters = list(num_iters) if num_iters else [int(defaults.get("num_iter", 16))]
    temperature = float(defaults.get("temperature", 1.0)) if temperature is None else float(temperature)
    size = first.config.img_size if hasattr(first.config, "img_size") else first.config.grid * 2 ** first.bae.upsamplings
    ref = make_reference(size, samples_per_class, seed=seed)
    if log:
        info = ref.classifier_info
        log(f"classifier: {info['arch']}, accuracy on {info['heldout_count']} held-out real digits "
            f"{info['heldout_accuracy']:.2%}")
        log(f"real-vs-real floor: FD {ref.real_vs_real_fd:.2f} ({ref.floor_count} train digits vs the "
            f"held-out digits), classifier accuracy on them {ref.real_vs_real_accuracy:.2%}")
    results = []
    for backend in backends:
        model = first if backend == backends[0] else _load_model(checkpoint, backend, device, precision)
        label = model.backend_name + ("" if precision == "fp32" else f"-{precision}") \
            + ("" if fast == "exact" else f" fast={fast if isinstance(fast, str) else json.dumps(fast)}")
        for num_iter in num_iters:
            for cfg in cfgs:
                start = time.time()
                images, labels = generate_digits(model, samples_per_class, float(cfg), int(num_iter),
                                                 temperature, seed, fast=fast)
                seconds = time.time() - start
                m = evaluate_samples(ref, images, labels)
                r = SweepResult(label, float(cfg), int(num_iter), temperature, m["accuracy"],
                                m["per_class"], m["fd"], round(seconds, 2), len(labels), fast)
                results.append(r)
                if log:
                    log(f"  {r.backend:>14s}  num_iter {r.num_iter:3d}  cfg {r.cfg:4.1f}  accuracy "
                        f"{r.accuracy:6.1%}  FD {r.fd:7.2f}  ({r.seconds:.1f}s)")
    return {
        "checkpoint": str(checkpoint), "samples_per_class": samples_per_class, "seed": seed,
        "precision": precision, "fast": fast,
        "temperature": temperature, "sampling_defaults": defaults,
        "num_sampling_steps": getattr(first.config, "num_sampling_steps", None), "image_size": size,
        "classifier": ref.classifier_info, "real_vs_real_fd": ref.real_vs_real_fd,
        "real_vs_real_accuracy": ref.real_vs_real_accuracy, "real_vs_real_count": ref.floor_count,
        "heldout_count": int(len(ref.heldout_features)),
        "results": [asdict(r) for r in results],
    }


# Output --------------------------------------------------------------------------------------
def format_table(report: dict, markdown: bool = False) -> str:
    head = ["backend", "num_iter", "cfg", "accuracy", "FD", "worst class", "seconds"]
    rows = []
    for r in report["results"]:
        worst = int(np.nanargmin(r["per_class"]))
        rows.append([r["backend"], str(r["num_iter"]), f"{r['cfg']:.1f}", f"{r['accuracy']:.1%}",
                     f"{r['fd']:.2f}", f"{worst}: {r['per_class'][worst]:.0%}", f"{r['seconds']:.1f}"])
    rows.append(["real train digits (floor)", "", "", f"{report['real_vs_real_accuracy']:.1%}",
                 f"{report['real_vs_real_fd']:.2f}", "", ""])
    rows.append(["real held-out digits", "", "", f"{report['classifier']['heldout_accuracy']:.1%}",
                 "(reference set)", "", ""])
    return text_table(head, rows, markdown)


def text_table(head: list, rows: list, markdown: bool = False) -> str:
    """Rows of strings as a markdown table or right-aligned plain text with a rule under the head."""
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*["-" * w for w in widths])] + [fmt.format(*r) for r in rows])


def format_per_class(report: dict, markdown: bool = False) -> str:
    head = ["backend", "num_iter", "cfg"] + [str(c) for c in range(NUM_CLASSES)]
    rows = [[r["backend"], str(r["num_iter"]), f"{r['cfg']:.1f}"] + [f"{a:.0%}" for a in r["per_class"]]
            for r in report["results"]]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join([fmt.format(*head)] + [fmt.format(*r) for r in rows])


def plot_report(report: dict, path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_fd) = plt.subplots(1, 2, figsize=(10, 4))
    results = report["results"]
    styles = ["-", "--", ":", "-."]
    markers = ["o", "x", "+", "s"]  # distinct, so backends with identical numbers stay visible
    backends = sorted({r["backend"] for r in results}, key=[r["backend"] for r in results].index)
    iters = sorted({r["num_iter"] for r in results})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for bi, backend in enumerate(backends):
        for ii, num_iter in enumerate(iters):
            sel = sorted((r for r in results if r["backend"] == backend and r["num_iter"] == num_iter),
                         key=lambda r: r["cfg"])
            if not sel:
                continue
            cfgs = [r["cfg"] for r in sel]
            label = f"num_iter {num_iter}" + (f" ({backend})" if len(backends) > 1 else "")
            kw = dict(color=colors[ii % len(colors)], linestyle=styles[bi % len(styles)],
                      marker=markers[bi % len(markers)], label=label)
            ax_acc.plot(cfgs, [100 * r["accuracy"] for r in sel], **kw)
            ax_fd.plot(cfgs, [r["fd"] for r in sel], **kw)
    ax_acc.axhline(100 * report["classifier"]["heldout_accuracy"], color="gray", linestyle="--",
                   label="real held-out digits")
    ax_fd.axhline(report["real_vs_real_fd"], color="gray", linestyle="--", label="real vs real (floor)")
    ax_acc.set(xlabel="cfg", ylabel="classified as requested class (%)", title="Accuracy")
    ax_fd.set(xlabel="cfg", ylabel="Fréchet distance (classifier features)", title="Fréchet distance (lower is better)")
    ax_fd.set_yscale("log")  # one-step sampling is far off; keep the good settings readable
    for ax in (ax_acc, ax_fd):
        ax.grid(alpha=0.3)
    ax_acc.legend(fontsize=8)  # the curves are the same on both panels: one legend for them
    ax_fd.legend(handles=ax_fd.get_lines()[-1:], fontsize=8, loc="lower right")
    fig.suptitle(f"{report['checkpoint']}: {report['samples_per_class']} samples per class, seed {report['seed']}")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _run(args) -> int:
    set_threads(args.threads)
    report = run_sweep(args.checkpoint, args.samples_per_class, args.cfg, args.num_iter, args.backends,
                       args.temperature, args.seed, args.device, precision=args.precision, fast=args.fast)
    print()
    print(format_table(report))
    print()
    print("per-class accuracy:")
    print(format_per_class(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.json}")
    if args.out:
        try:
            plot_report(report, args.out)
            print(f"wrote {args.out}")
        except ImportError:
            print("matplotlib is not installed: no plot written (pip install matplotlib)")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("evaluate", help="quality report of a digits model (accuracy, Fréchet distance)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="digits", help="engine model directory or built-in name")
    p.add_argument("--samples-per-class", type=int, default=20)
    p.add_argument("--cfg", type=float, nargs="+", default=[1.0, 2.0, 4.0], help="guidance scales to sweep")
    p.add_argument("--num-iter", type=int, nargs="+", default=None,
                   help="MAR step counts to sweep (default: the model's)")
    p.add_argument("--backends", nargs="+", default=None, choices=["reference", "native", "triton"],
                   help="default: every backend available on the device")
    p.add_argument("--temperature", type=float, default=None, help="(default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="sampling precision of every backend (see engine.load)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--fast", type=fast_argument, default="exact",
                   help="approximate sampling mode (docs/fast.md): exact (default), disa, lazy, speculative, "
                        "joined by '+', or a JSON object of their parameters")
    p.add_argument("--out", default="report.png", help="PNG plot (accuracy and FD vs cfg)")
    p.add_argument("--json", default=None, help="also write the full report as JSON")
    p.set_defaults(func=_run)
    return p
