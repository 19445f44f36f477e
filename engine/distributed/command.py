"""The `generate` subcommand's arguments (registered by engine.cli through `add_parser`)."""
from __future__ import annotations

import argparse

from ..arguments import add_config_argument, add_family_argument, add_setting_arguments
from .job import DEFAULT_GROUP_SIZE, Request

DESCRIPTION = """Generate N images to an ADM/DiT-format .npz (arr_0 uint8 [N, H, W, C], labels [N]),
in one process or under `torchrun --nproc_per_node K -m engine generate ...`, or on a Ray cluster
(--ray). Labels follow MAR's evaluation protocol: every class (or prompt) equally often, in order.

Image i is drawn with its own generator seeded from (--seed, i) and sampled in its canonical
group of --group-size consecutive indices, so arr_0 is byte-identical for every --batch-size and
process count (given the same device kind, backend, precision and --threads). Finished parts of
--batch-size images are written atomically to OUT.npz.parts/: rerunning the same command resumes;
the merge checks that every image is there exactly once and refuses parts of other arguments.

Metrics after the merge: for digit images the built-in digits classifier's accuracy and Fréchet
distance (offline); --inception-weights FILE (local; never downloaded) for FID / IS through
torch-fidelity against --fid-ref REF.npz. See docs/generation.md."""


def _command(args) -> int:
    from .metrics import Metrics

    request = Request.from_namespace(args)
    metrics = Metrics(args.fid_ref, args.inception_weights, enabled=not args.no_metrics,
                      json_out=args.metrics_json)
    if args.ray is not None:
        from .ray_data import generate_ray

        generate_ray(request=request, address=None if args.ray == "local" else args.ray,
                     num_workers=args.workers, metrics=metrics)
        return 0
    from .run import run

    run(request, metrics=metrics)
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("generate", help="N images to an ADM-format .npz (torchrun / Ray, resumable)",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="digits", help="published .pth, engine model directory, or 'digits'")
    add_family_argument(p)
    add_config_argument(p)
    p.add_argument("--vae", default=None, help="kl16.ckpt (MAR) or an AutoencoderKL directory (Fluid)")
    p.add_argument("--bae", default=None, help="ELM's binaryae_ema.th (binary-token models that ship none)")
    p.add_argument("--text-encoder", default=None, help="local Hugging Face T5 directory (Fluid)")
    p.add_argument("--num-images", type=int, required=True, help="N, a multiple of the classes / prompts")
    p.add_argument("--classes", type=int, nargs="+", default=None,
                   help="class labels, each drawn N / len(classes) times (default: every class of the model)")
    p.add_argument("--prompts-file", default=None, help="text-to-image: one prompt a line, each N / P times")
    p.add_argument("--height", type=int, default=None, help="text-to-image image height (default img_size)")
    p.add_argument("--width", type=int, default=None, help="text-to-image image width (default img_size)")
    p.add_argument("--seed", type=int, default=0, help="image i's generator is seeded from (seed, i)")
    p.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE,
                   help="images per sampling call: the canonical groups the images are computed in "
                        f"(they depend on it, like on the seed; default {DEFAULT_GROUP_SIZE})")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per finished part a process claims and writes (rounded up to whole "
                        "groups; default one group); does not change the images")
    add_setting_arguments(p)
    p.add_argument("--steps", default=None, help="diffusion respacing: '100', 'ddim25', '10,5'")
    p.add_argument("--backend", default="auto", choices=["auto", "reference", "native", "triton"])
    p.add_argument("--device", default="auto",
                   help="auto (cuda if available), cpu, cuda (under torchrun: cuda:LOCAL_RANK)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads per process (part of what the bits depend on; default 1: scale "
                        "with processes)")
    p.add_argument("--out", required=True, help="the .npz to write")
    p.add_argument("--png-dir", default=None, help="also write {i:05d}.png here")
    p.add_argument("--keep-parts", action="store_true", help="keep OUT.npz.parts/ after the merge")
    p.add_argument("--fid-ref", default=None, help="reference images (.npz, arr_0 uint8 NHWC) for the FD / FID")
    p.add_argument("--inception-weights", default=None,
                   help="torch-fidelity's InceptionV3 weights file (local) for FID / IS")
    p.add_argument("--no-metrics", action="store_true", help="skip the metrics")
    p.add_argument("--metrics-json", default=None, help="also write the metrics as JSON")
    p.add_argument("--ray", default=None, nargs="?", const="local", metavar="ADDRESS",
                   help="run on Ray (Data map_batches, one device per worker): 'local', 'auto' or an address")
    p.add_argument("--workers", type=int, default=None, help="Ray workers (default: one per GPU / per --threads CPUs)")
    p.set_defaults(func=_command)
    return p
