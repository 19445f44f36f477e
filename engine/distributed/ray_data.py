"""The cluster path: `generate_ray(...)` runs a job's work items through Ray Data (`map_batches`
over an actor pool, one device per worker) and gives the same images as `engine generate` under
torchrun with the same arguments: the same canonical groups, seeds and spec, and the same part
store, so a job may even be started with torchrun and finished with Ray, or the reverse.

The driver needs no GPU. One probe (a task in a worker's slot for GPU jobs, the driver itself
for CPU jobs) loads the model and checks the job exactly as a torchrun rank does, then returns
it; the workers load
the model once each, check that their spec equals the probe's, and send back uint8 images; the
driver writes each finished item as a part (so a killed driver loses only the items in flight:
run it again to resume), merges the parts into `out` and scores it.

Paths (checkpoint, VAE, text encoder, prompts file) must be readable on every worker's node,
`out` on the driver's."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from ..core.errors import EngineError
from .job import Request, make_spec, work_items
from .store import PartStore, write_pngs


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise EngineError("the Ray path needs Ray Data: pip install 'engine[ray]'") from None
    return ray


def _probe(request: Request):
    """In a worker's slot: ('ok', job, image shape) or ('error', message)."""
    from .run import prepare
    from .worker import resolve_device

    try:
        sampler, job = prepare(request, resolve_device(request.device), paths=False)
        return "ok", job, sampler.image_shape()
    except EngineError as err:
        return "error", str(err), None


class _Worker:
    """A Ray Data actor: one GroupSampler on its device; a batch row is a work item."""

    def __init__(self, job):
        from .job import spec_hash
        from .worker import GroupSampler, resolve_device

        self.job = job
        self.sampler = GroupSampler(job.request, resolve_device(job.request.device))
        spec = make_spec(job, getattr(self.sampler.model.config, "num_sampling_steps", None), self.sampler.weights(),
                         self.sampler.env())
        if spec_hash(spec) != spec_hash(job.spec):
            raise EngineError(f"a Ray worker's weights or environment differ from the probe's: {spec['env']} "
                              f"{spec['weights']} vs {job.spec['env']} {job.spec['weights']}")

    def __call__(self, batch: dict) -> dict:
        starts, indices, images = [], [], []
        for start, stop in zip(batch["start"].tolist(), batch["stop"].tolist()):
            images.append(self.sampler.sample_item(self.job, start, stop))
            indices.append(np.arange(start, stop))
            starts.append(np.full(stop - start, start))
        return {"item": np.concatenate(starts), "index": np.concatenate(indices),
                "image": np.concatenate(images)}


def generate_ray(num_images: int | None = None, out=None, checkpoint: str = "digits", *,
                 num_workers: int | None = None, address: str | None = None, request: Request | None = None,
                 metrics=None, log=print, progress: bool = True, **kwargs) -> Path:
    """Generate `num_images` images into `out` (.npz, as `engine generate` writes it) on a Ray
    cluster: the one `ray.init(address=address)` connects to, or the one already initialised.
    Keyword arguments are `engine generate`'s options (classes, prompts or prompts_file, seed,
    group_size, batch_size, num_iter, cfg, cfg_schedule, temperature, steps, vae, text_encoder,
    height, width, backend, precision, device ("auto": cuda when the cluster has GPUs), threads,
    png_dir, keep_parts). `num_workers`: actors (default: one per GPU, or per `threads` CPUs).
    `metrics`: an engine.distributed.Metrics (default: none). Returns the output path."""
    ray = _ray()
    if request is None:
        request = Request(num_images=num_images, out=str(out), checkpoint=checkpoint, **kwargs)
    request.check()
    if not ray.is_initialized():
        ray.init(address=address)
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if request.device == "auto":
        request = replace(request, device="cuda" if gpus else "cpu")
    use_gpu = request.device.startswith("cuda")
    slot = {"num_gpus": 1} if use_gpu else {"num_cpus": request.threads}

    if use_gpu:   # the driver may have no GPU: check the job in a worker's slot
        status, job, shape = ray.get(ray.remote(**slot)(_probe).remote(request))
    else:         # a CPU job: check it here (no extra process; same checks)
        import torch

        threads = torch.get_num_threads()
        try:
            status, job, shape = _probe(request)
        finally:
            torch.set_num_threads(threads)
    if status == "error":
        raise EngineError(job)
    if metrics is not None:
        metrics.check(shape)
    store = PartStore(request.out)
    if store.check_output(job.spec):
        log(f"{store.out} is complete (made with these arguments); nothing to generate")
        if request.png_dir is not None:
            write_pngs(store.out, request.png_dir)
    else:
        store.check(job.spec)
        store.write_manifest(job.spec)
        store.clean_temporaries()
        done = store.done_groups(job.spec, job.group_size, job.num_images)
        items = work_items([g for g in range(job.num_groups) if g not in done], job.group_size,
                           job.num_images, job.groups_per_item)
        if items:
            if num_workers is None:
                num_workers = gpus if use_gpu else max(1, int(resources.get("CPU", 1)) // request.threads)
            num_workers = max(1, min(num_workers, len(items)))
            log(f"generate (Ray): {job.num_images} images in groups of {job.group_size}, {num_workers} "
                f"workers ({job.spec['env']['backend']} on {job.spec['env']['device']})"
                + (f"; resuming: {len(done)} groups done" if done else ""))
            _run_items(ray, job, store, items, num_workers, slot, progress)
        shape = store.merge(job.spec, job.labels(), job.prompts, request.png_dir, request.keep_parts)
        log(f"wrote {store.out}: arr_0 uint8 {list(shape)}, labels [{shape[0]}]")
    if metrics is not None:
        metrics.compute(store.out, "cpu", log)
    return store.out


def _run_items(ray, job, store: PartStore, items, num_workers: int, slot: dict, progress: bool) -> None:
    ds = ray.data.from_items([{"start": a, "stop": b} for a, b in items], override_num_blocks=len(items))
    ds = ds.map_batches(_Worker, batch_size=1, compute=ray.data.ActorPoolStrategy(size=num_workers),
                        fn_constructor_kwargs={"job": job}, **slot)
    labels = job.labels()
    stops = dict(items)
    pending: dict[int, dict[int, np.ndarray]] = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=job.num_images, initial=store.done_images(), unit="img", desc="generate", disable=None)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for item, index, image in zip(batch["item"].tolist(), batch["index"].tolist(), batch["image"]):
            pending.setdefault(item, {})[index] = image
        for item in [k for k, got in pending.items() if len(got) == stops[k] - k]:
            got = pending.pop(item)
            images = np.stack([got[i] for i in range(item, stops[item])])
            store.write_part(job.spec, item, stops[item], images, labels[item:stops[item]])
            if bar is not None:
                bar.update(len(images))
    if bar is not None:
        bar.close()
    if pending:
        raise EngineError(f"Ray returned incomplete work items {sorted(pending)[:4]}; rerun to finish them")
