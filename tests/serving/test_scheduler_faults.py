"""The Scheduler's admission (free slots vs the queue, priorities with aging) and fault isolation
(a failed step is retried by groups, then image by image: only the request whose image fails
gets the error; the others finish with their solo images)."""
import threading

import pytest
import torch

import engine
from servers import Gate
from engine.serving import QueueFullError, Request, Scheduler, WorkerError
from helpers import rel_err

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return engine.load("digits", num_sampling_steps="10")


def solo(model, label, seed, **settings):
    return model.sample_tokens(1, labels=[label], generator=[torch.Generator().manual_seed(seed)],
                               **model.resolve_settings(**settings))




def test_a_request_that_fits_free_slots_is_not_queued(model, monkeypatch):
    """Was: a burst against an idle server was refused for requests it had room for, because
    only the worker admitted requests, between steps (24 x 2 images, --max-queue 16, 32 free
    slots: 8 x 429). Now a request that fits the free slots never counts against the queue."""
    gate = Gate(monkeypatch)
    with Scheduler(model, max_batch_images=32, max_queue=2, admit_wait=0) as sched:
        first = sched.submit(Request(label=0, n=2, num_iter=2))
        assert gate.entered.wait(30)                     # the worker is inside a step
        fitting = [sched.submit(Request(label=i % 10, n=2, num_iter=2, seed=i)) for i in range(15)]
        assert sched.queue_depth == 0                    # 2 + 30 images: all fit, none queued
        waiting = [sched.submit(Request(label=1, n=2, num_iter=2)) for _ in range(2)]
        assert sched.queue_depth == 2
        with pytest.raises(QueueFullError, match="2 requests waiting for room"):
            sched.submit(Request(label=1, num_iter=2))
        gate.release.set()
        results = [f.result(60) for f in [first, *fitting, *waiting]]
    assert all(r.tokens.shape[0] == 2 for r in results) and sched.counts["rejected_full"] == 1
    assert rel_err(results[3].tokens[1:], solo(model, 2, 3, num_iter=2)) <= 1e-4


def test_priority_first_and_aging_prevents_starvation(model, monkeypatch):
    gate = Gate(monkeypatch)
    order = []
    with Scheduler(model, max_batch_images=1, max_queue=8, admit_wait=0, priority_aging=1000) as sched:
        sched.add_finish_listener(lambda status, seconds, images: None)
        first = sched.submit(Request(label=0, num_iter=1))
        assert gate.entered.wait(30)
        futures = {p: sched.submit(Request(label=1, num_iter=1, priority=p)) for p in (-5, 0, 7, 3)}
        for p, f in futures.items():
            f.add_done_callback(lambda _, p=p: order.append(p))
        gate.release.set()
        [f.result(60) for f in [first, *futures.values()]]
    assert order == [7, 3, 0, -5]
    # Aging: a request that waited 10 priority_aging periods outranks a fresh one 5 levels higher.
    gate = Gate(monkeypatch)
    order.clear()
    with Scheduler(model, max_batch_images=1, max_queue=8, admit_wait=0, priority_aging=0.01) as sched:
        first = sched.submit(Request(label=0, num_iter=1))
        assert gate.entered.wait(30)
        old = sched.submit(Request(label=1, num_iter=1, priority=0))
        threading.Event().wait(0.1)
        new = sched.submit(Request(label=1, num_iter=1, priority=5))
        old.add_done_callback(lambda _: order.append("old"))
        new.add_done_callback(lambda _: order.append("new"))
        gate.release.set()
        [f.result(60) for f in (first, old, new)]
    assert order == ["old", "new"]


@pytest.mark.parametrize("field,value", [("priority", 1001), ("priority", 1.5), ("partial_images", 4),
                                         ("partial_images", -1)])
def test_priority_and_partial_images_are_checked(model, field, value):
    from engine.serving import RequestError

    with Scheduler(model, start=False) as sched, pytest.raises(RequestError) as err:
        sched.submit(Request(label=1, **{field: value}))
    assert err.value.field == field


def test_a_failing_image_fails_only_its_request(model, monkeypatch):
    """Was: one request whose sampling failed took every request in flight with it. The fault is
    injected inside the step (the noise draw of one image, after the images before it drew
    theirs): that request gets a WorkerError, every other image equals its solo run."""
    import engine.core.loop as loop

    bad_seed = 500 + 1                      # image 1 of the request with seed 500
    real = loop._draw_one

    def draw(num_steps, n, dim, use_cfg, generator, device):
        if generator.initial_seed() == bad_seed:
            raise RuntimeError("injected fault in one image")
        return real(num_steps, n, dim, use_cfg, generator, device)
    monkeypatch.setattr(loop, "_draw_one", draw)
    requests = [Request(label=1, n=2, num_iter=3, seed=100), Request(label=2, n=2, num_iter=3, seed=500),
                Request(label=3, num_iter=5, cfg=1.0, seed=700), Request(label=4, num_iter=3, seed=900)]
    with Scheduler(model, max_batch_images=8, admit_wait=0.05) as sched:
        futures = [sched.submit(r) for r in requests]
        with pytest.raises(WorkerError, match="injected fault in one image") as err:
            futures[1].result(60)
        assert isinstance(err.value.__cause__, RuntimeError)
        results = {i: futures[i].result(60) for i in (0, 2, 3)}
    assert sched.counts["error"] == 1 and sched.counts["ok"] == 3 and sched.images_in_flight == 0
    for i, result in results.items():
        r = requests[i]
        for k in range(r.n):
            want = solo(model, r.label, r.seed + k, num_iter=r.num_iter, cfg=r.cfg)
            assert rel_err(result.tokens[k:k + 1], want) <= 1e-4, (i, k)


def test_a_transient_step_failure_fails_nobody(model, monkeypatch):
    """A step that fails once after every image drew its noise: the retry starts from the
    generators' states before the step, so every image is still its solo run."""
    import engine.core.loop as loop

    real, calls = loop.advance, []

    def advance(m, images):
        calls.append(1)
        if len(calls) == 2:
            for image in images:               # draw, as the step does, then fail
                torch.randn(8, generator=image.generator)
            raise RuntimeError("transient")
        return real(m, images)
    monkeypatch.setattr("engine.model.advance", advance)
    with Scheduler(model, max_batch_images=4, admit_wait=0.05) as sched:
        futures = [sched.submit(Request(label=i, num_iter=4, seed=10 + i)) for i in range(3)]
        results = [f.result(60) for f in futures]
    assert sched.counts["ok"] == 3
    for i, result in enumerate(results):
        assert rel_err(result.tokens, solo(model, i, 10 + i, num_iter=4)) <= 1e-4


@pytest.mark.parametrize("name,target", [("digits-elm-ar", "engine.families.elm.exponential_noise"),
                                         ("digits-ctf", "engine.families.elm.exponential_noise"),
                                         ("digits-causal", "engine.families.causal._draw_one")])
def test_a_fault_inside_a_kv_cache_step_releases_its_rows(name, target, monkeypatch):
    """The fault strikes inside the step of a KV-cache family, after the joining images claimed
    rows and were prefilled and the rows held were decoded: the step gives the rows back, the
    retries rewrite the decoded positions with the same values, and the survivors equal their
    solo runs token for token (causal: within float rounding)."""
    import importlib

    module_name, attr = target.rsplit(".", 1)
    module = importlib.import_module(module_name)
    real = getattr(module, attr)
    bad_seed = 41

    def faulty(*args, **kwargs):
        if any(isinstance(a, torch.Generator) and a.initial_seed() == bad_seed for a in args):
            raise RuntimeError("injected fault")
        return real(*args, **kwargs)
    monkeypatch.setattr(module, attr, faulty)
    model = engine.load(name, num_sampling_steps="10" if name == "digits-causal" else None)
    requests = [Request(label=i, n=2, cfg=[1.0, 2.0][i % 2], seed=10 * i) for i in range(1, 5)]
    with Scheduler(model, max_batch_images=8, admit_wait=0.05) as sched:
        futures = [sched.submit(r) for r in requests]
        with pytest.raises(WorkerError, match="injected fault"):
            futures[3].result(120)
        results = {i: futures[i].result(120) for i in (0, 1, 2)}
        assert sched.batcher.pool.used == 0
    for i, result in results.items():
        r = requests[i]
        for k in range(r.n):
            want = model.sample_tokens(1, labels=[r.label], generator=[torch.Generator().manual_seed(r.seed + k)],
                                       **model.resolve_settings(cfg=r.cfg))
            got = result.tokens[k:k + 1]
            assert torch.equal(got, want) if want.dtype == torch.int64 else rel_err(got, want) <= 1e-4, (i, k)
