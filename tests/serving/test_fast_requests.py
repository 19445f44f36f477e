"""fast= per request in the Scheduler: a "disa" request shares the batch with exact ones and gets
its engine.generate images; modes a batch cannot mix ("lazy") or a family lacks are refused
naming the field."""
import numpy as np
import pytest
import torch

import engine
from engine.serving import Request, RequestError, Scheduler, WorkerError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return engine.load("digits", num_sampling_steps="10")


def test_disa_and_exact_requests_share_the_scheduler(model):
    with Scheduler(model) as sched:
        futures = [sched.submit(Request(label=3, seed=7, num_iter=4, fast="disa")),
                   sched.submit(Request(label=5, seed=8, num_iter=4))]
        results = [f.result(timeout=120) for f in futures]
    assert results[0].request.fast == "disa" and results[1].request.fast == "exact"
    for result, label, seed, fast in zip(results, (3, 5), (7, 8), ("disa", "exact")):
        want = engine.generate(model, [label], num_iter=4, generator=[torch.Generator().manual_seed(seed)],
                               output_type="np", fast=fast)
        assert np.abs(result.images("np") - want).max() <= 1e-4


def test_modes_the_batch_or_family_cannot_run_are_refused(model):
    with Scheduler(model, start=False) as sched:
        with pytest.raises(RequestError) as err:
            sched.submit(Request(label=1, fast="speculative"))
    assert err.value.field == "fast" and "mar models cannot use 'speculative'" in str(err.value)
    with Scheduler(model) as sched:
        with pytest.raises((RequestError, WorkerError, engine.SamplingError), match="fast: 'lazy'"):
            sched.submit(Request(label=1, num_iter=2, fast="lazy")).result(timeout=120)
