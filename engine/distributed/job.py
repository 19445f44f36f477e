"""What a generation job is: its request (the command's arguments), the per-image conditions
and seeds, the canonical groups, and the spec that identifies its results.

Why canonical groups. Per-image generators make image i's random numbers independent of its
batch-mates, but not its arithmetic: a GEMM over B*n rows may pick another kernel, tile or
split-K for another B (cuBLAS heuristics, MKL's small-M paths; the engine's own Triton ResBlock
kernel chooses its hidden-dim split from the row count), which changes the last bits of image i,
and a last bit can flip a uint8 after rounding. So the engine never batches by B or by rank:
image indices are cut into fixed groups [g*G, (g+1)*G) (the last one shorter), and every group is
sampled by one call holding exactly that group, in that order, with the same generators. Such a
call has identical inputs whichever process, batch size or world size runs it, so it returns
identical bits wherever the computation is deterministic for identical inputs (same device kind,
backend, precision, library versions and, on CPU, intra-op thread count: all recorded in the
spec). This relies on run-to-run determinism only, never on batch invariance.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..arguments import check_decoder_arguments
from ..core.errors import EngineError

FORMAT = 1
MAX_SEED = 2 ** 63 - 1
MAX_IMAGES = 10 ** 9
DEFAULT_GROUP_SIZE = 64


def image_seed(seed: int, index: int) -> int:
    """The seed of image `index`'s own torch.Generator: the first 8 bytes of
    sha256("engine-generate:{seed}:{index}") read little-endian, top bit cleared. Distinct
    (seed, index) pairs give unrelated streams (seed + index would make image 1 of seed 0 the
    image 0 of seed 1)."""
    digest = hashlib.sha256(f"engine-generate:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & MAX_SEED


def protocol_conditions(num_images: int, count: int, what: str) -> list[int]:
    """MAR's evaluation protocol: each of `count` conditions (classes, prompts) equally often,
    condition-major in the given order: image i gets condition i // (num_images / count)."""
    if num_images % count:
        raise EngineError(f"--num-images {num_images} is not a multiple of the {count} {what}: "
                          f"each one is drawn equally often (MAR's evaluation protocol); "
                          f"use a multiple of {count}")
    per = num_images // count
    return [k for k in range(count) for _ in range(per)]


def groups(num_images: int, group_size: int) -> list[tuple[int, int]]:
    """The canonical groups: [start, stop) index ranges of `group_size` images (the last shorter)."""
    return [(a, min(a + group_size, num_images)) for a in range(0, num_images, group_size)]


def work_items(todo_groups: list[int], group_size: int, num_images: int,
               groups_per_item: int) -> list[tuple[int, int]]:
    """Index ranges [start, stop) of up to `groups_per_item` consecutive groups still to do:
    the unit a process claims, samples (group by group) and writes as one part."""
    items, run = [], []
    for g in sorted(todo_groups):
        if run and (g != run[-1] + 1 or len(run) == groups_per_item):
            items.append(run)
            run = []
        run.append(g)
    if run:
        items.append(run)
    return [(r[0] * group_size, min((r[-1] + 1) * group_size, num_images)) for r in items]


@dataclass
class Request:
    """The arguments of `engine generate` (and of engine.distributed.generate_ray)."""
    num_images: int
    out: str
    checkpoint: str = "digits"
    family: str | None = None
    config: list | None = None           # --config KEY=VALUE: configuration the checkpoint does not record
    vae: str | None = None
    bae: str | None = None
    text_encoder: str | None = None
    classes: list | None = None
    prompts_file: str | None = None
    prompts: list | None = None          # API only: prompts given as a list
    height: int | None = None
    width: int | None = None
    seed: int = 0
    group_size: int = DEFAULT_GROUP_SIZE
    batch_size: int | None = None        # images per part (rounded up to whole groups)
    num_iter: int | None = None
    cfg: float | None = None
    cfg_schedule: str | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    fast: object = None                  # --fast: a mode string or a dict (engine.core.fast)
    steps: str | None = None
    backend: str = "auto"
    device: str = "auto"
    precision: str = "fp32"
    threads: int = 1
    png_dir: str | None = None
    keep_parts: bool = False

    @classmethod
    def from_namespace(cls, args) -> "Request":
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in vars(args).items() if k in names})

    def check(self, paths: bool = True) -> None:
        """Everything checkable without the model: counts, seed and (with `paths`) the output
        paths; nothing is created."""
        from ..arguments import check_output

        for name, value, limit in (("--num-images", self.num_images, MAX_IMAGES),
                                   ("--group-size", self.group_size, 65536),
                                   ("--batch-size", self.batch_size, MAX_IMAGES),
                                   ("--threads", self.threads, 4096)):
            if value is None and name == "--batch-size":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise EngineError(f"{name} must be an integer of at least 1, got {value!r}")
            if value > limit:
                raise EngineError(f"{name}={value} exceeds the limit of {limit}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise EngineError(f"--seed must be an integer in [0, {MAX_SEED}], got {self.seed!r}")
        if self.classes is not None and (self.prompts_file is not None or self.prompts is not None):
            raise EngineError("pass --classes or --prompts-file, not both")
        if self.prompts_file is not None and self.prompts is not None:
            raise EngineError("pass prompts or a prompts file, not both")
        if not paths:
            return
        if not str(self.out).lower().endswith(".npz"):
            raise EngineError(f"--out {self.out}: generate writes an .npz (arr_0 uint8 [N, H, W, C] "
                              "and labels); give a file name ending in .npz")
        check_output(self.out)
        if self.png_dir is not None:
            png = Path(self.png_dir)
            if png.exists() and not png.is_dir():
                raise EngineError(f"--png-dir {png} exists and is not a directory")
            parent = png if png.is_dir() else (png.parent if str(png.parent) else Path("."))
            if not parent.is_dir():
                raise EngineError(f"--png-dir {png}: directory {parent} does not exist (create it first)")
            try:   # a real write, as engine.arguments.check_output does
                fd, probe = tempfile.mkstemp(dir=parent, prefix=".engine-write-test.")
                os.close(fd)
                os.unlink(probe)
            except OSError as err:
                raise EngineError(f"--png-dir {png}: cannot write in directory {parent} ({err.strerror})") from None

    def read_prompts(self) -> list[str] | None:
        if self.prompts is not None:
            prompts = list(self.prompts)
            if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
                raise EngineError("prompts must be a non-empty list of non-empty strings")
            return prompts
        if self.prompts_file is None:
            return None
        try:
            text = Path(self.prompts_file).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise EngineError(f"--prompts-file {self.prompts_file}: file not found") from None
        except (OSError, UnicodeDecodeError) as err:
            raise EngineError(f"--prompts-file {self.prompts_file}: cannot read it ({err})") from None
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
        if not prompts:
            raise EngineError(f"--prompts-file {self.prompts_file} has no prompts (one per line)")
        return prompts


@dataclass
class Job:
    """A checked request resolved against the loaded model: one condition and seed per image,
    the settings every call uses, and the spec that names the results."""
    request: Request
    settings: dict                 # the family's settings (model.resolve_settings)
    classes: list | None           # class ids (class-conditional models)
    prompts: list | None           # prompts (text-to-image models)
    conditions: list[int]          # per image: index into classes / prompts
    spec: dict = field(default_factory=dict)

    @property
    def num_images(self) -> int:
        return self.request.num_images

    @property
    def group_size(self) -> int:
        return self.request.group_size

    @property
    def groups_per_item(self) -> int:
        batch = self.request.batch_size or self.group_size
        return max(1, math.ceil(batch / self.group_size))

    @property
    def num_groups(self) -> int:
        return math.ceil(self.num_images / self.group_size)

    def labels(self):
        """The `labels` array of the output: class ids, or prompt indices for prompts."""
        import numpy as np

        if self.classes is not None:
            return np.asarray([self.classes[k] for k in self.conditions], dtype=np.int64)
        return np.asarray(self.conditions, dtype=np.int64)

    def group_of(self, start: int, stop: int) -> dict:
        """What one sampling call gets for images [start, stop)."""
        idx = range(start, stop)
        out = {"seeds": [image_seed(self.request.seed, i) for i in idx]}
        if self.classes is not None:
            out["labels"] = [self.classes[self.conditions[i]] for i in idx]
        else:
            out["prompts"] = [self.prompts[self.conditions[i]] for i in idx]
        return out


def resolve(request: Request, model) -> Job:
    """The job of a checked request for a loaded model; every sampling argument is validated
    here, before anything is written (through the model's family protocol)."""
    from ..core.conditioning import Condition

    settings = model.resolve_settings(num_iter=request.num_iter, cfg=request.cfg, cfg_schedule=request.cfg_schedule,
                                      temperature=request.temperature, top_k=request.top_k, top_p=request.top_p,
                                      fast=request.fast)
    prompts = request.read_prompts()
    if model.conditioning == "text":
        if request.classes is not None:
            raise EngineError("this is a text-to-image model: pass --prompts-file, not --classes")
        if prompts is None:
            raise EngineError("this is a text-to-image model: pass --prompts-file F (one prompt a line)")
        if request.text_encoder is None and getattr(model, "text_encoder", None) is None:
            raise EngineError("prompts need a text encoder: pass --text-encoder DIR (a local T5)")
        return Job(request, settings, None, prompts, protocol_conditions(request.num_images, len(prompts), "prompts"))
    if prompts is not None or request.text_encoder:
        raise EngineError("this is a class-conditional model: pass --classes, not prompts")
    if request.height or request.width:
        raise EngineError("--height / --width are for text-to-image models")
    check_decoder_arguments(model, request.vae, request.bae)
    classes = list(range(model.num_classes)) if request.classes is None else list(request.classes)
    if not classes:
        raise EngineError("--classes needs at least one class")
    Condition.labels(classes, len(classes), model.num_classes, "cpu")   # range check
    return Job(request, settings, classes, None, protocol_conditions(request.num_images, len(classes), "classes"))


# The spec ------------------------------------------------------------------------------------
def make_spec(job: Job, num_sampling_steps: str | None, weights: dict, env: dict) -> dict:
    """Everything the images depend on: the resolved arguments, the weights, and the execution
    environment (backend, device kind, CPU threads, torch). Not the batch size or world size."""
    import engine

    r = job.request
    if job.classes is not None:
        conditions = {"kind": "class", "classes": [int(c) for c in job.classes]}
    else:
        text = "\n".join(job.prompts)
        conditions = {"kind": "prompt", "count": len(job.prompts),
                      "sha256": hashlib.sha256(text.encode()).hexdigest()}
    args = {"num_images": r.num_images, "seed": r.seed, "group_size": r.group_size,
            "conditions": conditions,
            # fast "exact" (the default) is left out: specs of exact runs stay as they were
            **{k: list(v) if isinstance(v, tuple) else v for k, v in job.settings.items()
               if not (k == "fast" and v == "exact")},
            "num_sampling_steps": None if num_sampling_steps is None else str(num_sampling_steps),
            "height": r.height, "width": r.width, "precision": r.precision,
            **({"config": sorted(r.config)} if r.config else {})}
    return {"format": FORMAT, "engine": engine.__version__, "args": args, "weights": weights, "env": env}


def spec_hash(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def spec_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """'key: old -> new' for every leaf that differs."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += spec_diff(a, b, name + ".")
        elif a != b:
            out.append(f"{name}: {_short(a)} -> {_short(b)}")
    return out


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


