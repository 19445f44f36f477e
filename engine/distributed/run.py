"""`engine generate`: one process, or one per device under torchrun (torch.distributed: gloo on
CPU, nccl on GPU; rank -> device cuda:LOCAL_RANK).

Every process loads the model, resolves and checks the job and its spec (so every user error is
found before anything is written, by every rank alike; rank 0 alone prints it). The ranks then
agree that their specs are equal (the same weights, backend and device kind everywhere), rank 0
records the spec in the parts directory and lists the work items still to do, and rank r takes
items r, r + K, r + 2K, ... Each finished item is written as one part; after a barrier rank 0
merges the parts into --out and computes the metrics."""
from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch

from ..core.errors import EngineError
from .job import Job, Request, make_spec, resolve, spec_hash, work_items
from .store import PartStore, write_pngs
from .worker import GroupSampler, resolve_device

BARRIER_TIMEOUT = timedelta(days=7)   # ranks may finish hours apart; a dead rank ends the job anyway


class World:
    """Rank, world size and the collectives this command needs (none in a single process)."""

    def __init__(self):
        self.size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.started = False

    def start(self, device: torch.device) -> None:
        if self.size > 1:
            import torch.distributed as dist

            backend = "nccl" if device.type == "cuda" else "gloo"
            kw = {"device_id": device} if device.type == "cuda" else {}
            dist.init_process_group(backend, timeout=BARRIER_TIMEOUT, **kw)
            self.started = True

    def all_gather(self, obj) -> list:
        if not self.started:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        if not self.started:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.started:
            import torch.distributed as dist

            dist.barrier()

    def stop(self) -> None:
        if self.started:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.started = False


def prepare(request: Request, device: torch.device, paths: bool = True) -> tuple[GroupSampler, Job]:
    """Check the request, load the model, resolve the job and its full spec."""
    request.check(paths)
    sampler = GroupSampler(request, device)
    job = resolve(request, sampler.model)
    job.spec = make_spec(job, getattr(sampler.model.config, "num_sampling_steps", None), sampler.weights(), sampler.env())
    return sampler, job


def run(request: Request, log=print, metrics=None) -> dict:
    """The whole command in this process (one rank of K under torchrun). Returns a summary."""
    world, threads = World(), torch.get_num_threads()
    try:
        return _run_checked(world, request, log, metrics)
    finally:
        torch.set_num_threads(threads)   # called from Python, leave the caller's threads as they were


def _run_checked(world, request, log, metrics) -> dict:
    try:
        device = resolve_device(request.device, world.local_rank)
        sampler, job = prepare(request, device)
        store = PartStore(request.out)
        complete = store.check_output(job.spec)
        if not complete:
            store.check(job.spec)
        if metrics is not None:
            metrics.check(sampler.image_shape())
    except EngineError:
        if world.rank != 0:   # every rank found the same error; rank 0 says it once
            raise SystemExit(2)
        raise
    world.start(device)
    try:
        return _run(world, request, sampler, job, store, complete, log, metrics)
    finally:
        world.stop()


def _run(world, request, sampler, job, store, complete, log, metrics) -> dict:
    specs = world.all_gather((spec_hash(job.spec), job.spec["env"], job.spec["weights"]))
    plan = None
    if len({s[0] for s in specs}) > 1:
        plan = ("error", "the ranks disagree on what the images depend on (weights, backend, device "
                f"kind, threads: {[s[1:] for s in specs]}); run every rank with the same ones")
    elif world.rank == 0 and not complete:
        try:
            plan = ("items", _plan(world, store, job, log))
        except EngineError as err:
            plan = ("error", str(err))
    plan = world.broadcast(plan)
    if plan is not None and plan[0] == "error":
        if world.rank != 0:
            raise SystemExit(2)
        raise EngineError(plan[1])
    items = plan[1] if plan is not None else None
    made = 0
    if items:
        mine = items[world.rank::world.size]
        bar = _progress(world, job, store) if world.rank == 0 else None
        labels = job.labels()
        for start, stop in mine:
            images = sampler.sample_item(job, start, stop)
            store.write_part(job.spec, start, stop, images, labels[start:stop], world.rank)
            made += stop - start
            if bar is not None:
                bar.n = store.done_images()
                bar.refresh()
        if bar is not None:
            bar.close()
    world.barrier()
    summary = {"out": str(store.out), "made": made, "rank": world.rank}
    if world.rank != 0:
        return summary
    if complete:
        log(f"{store.out} is complete (made with these arguments); nothing to generate")
        if request.png_dir is not None:
            write_pngs(store.out, request.png_dir)
        if store.dir.is_dir() and not request.keep_parts:
            store.remove()
    else:
        shape = store.merge(job.spec, job.labels(), job.prompts, request.png_dir, request.keep_parts)
        log(f"wrote {store.out}: arr_0 uint8 {list(shape)}, labels [{shape[0]}]"
            + (f", PNGs in {request.png_dir}" if request.png_dir else ""))
    if metrics is not None:
        summary["metrics"] = metrics.compute(store.out, sampler.device, log)
    return summary


def _plan(world, store, job, log) -> list[tuple[int, int]]:
    """Rank 0: record the spec, drop dead temporaries, list the work items still to do."""
    store.write_manifest(job.spec)
    store.clean_temporaries()
    done = store.done_groups(job.spec, job.group_size, job.num_images)
    todo = [g for g in range(job.num_groups) if g not in done]
    items = work_items(todo, job.group_size, job.num_images, job.groups_per_item)
    done_images = job.num_images - sum(b - a for a, b in items)
    env = job.spec["env"]
    log(f"generate: {job.num_images} images in groups of {job.group_size}, {world.size} "
        f"process{'es' if world.size > 1 else ''} ({env['backend']} on {env['device']})"
        + (f"; resuming: {done_images} done, {len(items)} parts to make" if done_images else ""))
    return items


def _progress(world, job, store):
    from tqdm.auto import tqdm

    return tqdm(total=job.num_images, initial=store.done_images(), unit="img", desc="generate",
                disable=None, file=sys.stderr)
