"""Generation at scale: N images to an ADM/DiT-format .npz, identical for any batch size and
world size, resumable after a crash.

    python -m engine generate --num-images 50000 --seed 0 --out samples.npz ...
    torchrun --nproc_per_node 8 -m engine generate --num-images 50000 --device cuda ...
    engine.distributed.generate_ray(50000, "samples.npz", checkpoint=..., ...)   # Ray Data

job.py      the request, per-image conditions (MAR's protocol) and seeds, canonical groups, spec
worker.py   one process's model and how it samples a group (uint8 images)
store.py    atomic parts + manifest, the checked streaming merge, PNGs
run.py      one process / torchrun ranks (torch.distributed: gloo on CPU, nccl on GPU)
ray_data.py the Ray Data path
metrics.py  digits-feature FD / accuracy (offline), FID / IS through torch-fidelity
command.py  the `generate` subcommand (engine.cli registers it through add_parser)

Nothing here imports Ray or torch-fidelity until they are used. See docs/generation.md."""
from __future__ import annotations

from .command import add_parser
from .job import Request, image_seed
from .metrics import Metrics, compute_metrics


def generate_ray(*args, **kwargs):
    """Generate on a Ray cluster with Ray Data; the same images as `engine generate` / torchrun.
    See engine.distributed.ray_data.generate_ray (Ray is imported on first use)."""
    from .ray_data import generate_ray as _generate_ray

    return _generate_ray(*args, **kwargs)


def generate(request: Request | None = None, metrics: Metrics | None = None, **kwargs) -> dict:
    """`engine generate` from Python in this process (or in each torchrun rank): a Request, or
    its fields as keywords (num_images=..., out=..., ...). Returns a summary dict."""
    from .run import run

    return run(request or Request(**kwargs), metrics=metrics)


__all__ = ["add_parser", "generate", "generate_ray", "Request", "Metrics", "compute_metrics", "image_seed"]
