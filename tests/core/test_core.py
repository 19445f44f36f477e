"""The sampling core shared by every family: per-image generators, per-image cfg / temperature
in one batch, the graph runner's cache and buffers, engine.generate's defaults."""
import numpy as np
import pytest
import torch

import engine
from engine import SamplingError
from engine.backends import available_backends
from engine.families.fluid import FluidModel
from engine.core.runners import graphed_runner
from engine.families.mar import MARModel
from helpers import random_fluid, random_mar, rel_err

CPU_BACKENDS = [b for b in available_backends("cpu") if b in ("native", "reference")]


def gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.fixture(scope="module")
def mar_model():
    return random_mar(0, img_size=64, num_sampling_steps="8")   # 4 x 4 tokens


@pytest.fixture(scope="module")
def fluid_model():
    return random_fluid(0, num_sampling_steps="8")


def sample_mar(model, labels, seeds, **kw):
    return model.sample_tokens(len(labels), num_iter=4, labels=labels, generator=gens(seeds), **kw)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("cfg", [1.0, 2.5])
def test_mar_image_depends_on_its_generator_alone(mar_model, backend, cfg):
    model = MARModel(mar_model, backend=backend)
    labels, seeds = [3, 1, 4, 1], [10, 11, 12, 13]
    batch = sample_mar(model, labels, seeds, cfg=cfg, temperature=0.9)
    for i in range(4):
        alone = sample_mar(model, [labels[i]], [seeds[i]], cfg=cfg, temperature=0.9)
        assert rel_err(batch[i:i + 1], alone) <= 1e-5
    # Batch order and batch-mates do not matter either.
    perm = [2, 0, 3]
    other = sample_mar(model, [labels[i] for i in perm], [seeds[i] for i in perm], cfg=cfg, temperature=0.9)
    assert rel_err(other, batch[perm]) <= 1e-5
    # A list of one generator is the same as that generator for a batch of one.
    single = model.sample_tokens(1, num_iter=4, labels=[3], cfg=cfg, temperature=0.9,
                                 generator=torch.Generator().manual_seed(10))
    assert torch.equal(single, sample_mar(model, [3], [10], cfg=cfg, temperature=0.9))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_images_with_different_settings_share_a_batch(mar_model, backend):
    """cfg, cfg_schedule and temperature per image: each image as if sampled alone."""
    model = MARModel(mar_model, backend=backend)
    labels, seeds = [0, 5, 7], [1, 2, 3]
    cfgs, schedules, temps = [1.0, 3.0, 1.5], ["linear", "constant", "linear"], [1.0, 0.7, 1.2]
    batch = sample_mar(model, labels, seeds, cfg=cfgs, cfg_schedule=schedules, temperature=temps)
    for i in range(3):
        alone = sample_mar(model, [labels[i]], [seeds[i]], cfg=cfgs[i], cfg_schedule=schedules[i],
                           temperature=temps[i])
        # The cfg=1 image runs with a unit guidance scale inside a CFG batch: equal up to rounding.
        assert rel_err(batch[i:i + 1], alone) <= 1e-5, i


def test_fluid_image_depends_on_its_generator_alone(fluid_model):
    model = FluidModel(fluid_model, backend="reference")
    texts = torch.randn(3, 5, 12, generator=torch.Generator().manual_seed(0))
    kw = dict(num_iter=4, cfg=3.0, height=128, width=192)
    batch = model.sample_tokens(3, texts=texts, generator=gens([5, 6, 7]), **kw)
    for i in range(3):
        alone = model.sample_tokens(1, texts=texts[i:i + 1], generator=gens([5 + i]), **kw)
        assert rel_err(batch[i:i + 1], alone) <= 1e-5


def test_generator_arguments_are_checked(mar_model):
    model = MARModel(mar_model, backend="reference")
    with pytest.raises(SamplingError, match="got 2 generators for 3 images"):
        model.sample_tokens(3, num_iter=2, generator=gens([1, 2]))
    with pytest.raises(SamplingError, match="entries must be torch.Generator"):
        model.sample_tokens(2, num_iter=2, generator=[torch.Generator(), 3])
    with pytest.raises(SamplingError, match="must be a torch.Generator or a list"):
        model.sample_tokens(2, num_iter=2, generator=7)
    with pytest.raises(SamplingError, match="cfg has 2 entries for 3 images"):
        model.sample_tokens(3, num_iter=2, cfg=[1.0, 2.0])
    with pytest.raises(SamplingError, match="temperature must be a finite number"):
        model.sample_tokens(2, num_iter=2, temperature=[1.0, -1.0])


def test_graph_runner_is_shared_by_settings_and_keeps_the_eager_tokens(mar_model, monkeypatch):
    """The CUDA-graph runner's host side on CPU (static buffers, no capture): plans of one shape
    share one runner whatever the cfg / temperature, and give the eager tokens."""
    model = MARModel(mar_model, backend="reference")
    eager = [sample_mar(model, [1, 2], [3, 4], cfg=c, temperature=t) for c, t in ((2.0, 1.0), (4.0, 0.8))]
    monkeypatch.setattr(model, "step_runner", lambda plan, grid: graphed_runner(model, plan, grid))
    static = [sample_mar(model, [1, 2], [3, 4], cfg=c, temperature=t) for c, t in ((2.0, 1.0), (4.0, 0.8))]
    assert len(model._graph_cache) == 1
    runner = next(iter(model._graph_cache.values()))
    assert not runner.capture and runner.graphs is None   # CPU: the same buffers, run eagerly
    for a, b in zip(eager, static):
        assert torch.equal(a, b)
    sample_mar(model, [1, 2], [3, 4], cfg=1.0)            # no CFG: another shape, another runner
    assert len(model._graph_cache) == 2


def test_graph_runner_serves_fluid_too(fluid_model, monkeypatch):
    """The same runner for a text family: the step context (positions, text K/V) goes into
    static buffers; a call with other texts of the same shape reuses the runner."""
    model = FluidModel(fluid_model, backend="reference")
    texts = [torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(s)) for s in (0, 1)]
    kw = dict(num_iter=3, cfg=2.0, height=128, width=192)
    eager = [model.sample_tokens(2, texts=t, generator=gens([1, 2]), **kw) for t in texts]
    monkeypatch.setattr(model, "step_runner", lambda plan, grid: graphed_runner(model, plan, grid))
    static = [model.sample_tokens(2, texts=t, generator=gens([1, 2]), **kw) for t in texts]
    assert len(model._graph_cache) == 1
    for a, b in zip(eager, static):
        assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("family", ["mar", "fluid"])
def test_cuda_graph_capture_replays_the_eager_tokens(family):
    backend = "triton" if "triton" in available_backends("cuda") else "reference"
    if family == "mar":
        module, cls = random_mar(0, img_size=64, num_sampling_steps="8").cuda(), MARModel
        kw = dict(labels=[1, 2])
    else:
        module, cls = random_fluid(0, num_sampling_steps="8").cuda(), FluidModel
        kw = dict(texts=torch.randn(2, 5, 12, device="cuda"), height=128, width=192)
    graphed = cls(module, backend=backend, cuda_graphs=True)
    eager = cls(module, backend=backend, cuda_graphs=False)
    for cfg in (1.0, 3.0):
        gen = [torch.Generator("cuda").manual_seed(s) for s in (1, 2)]
        want = eager.sample_tokens(2, num_iter=4, cfg=cfg, generator=gen, **kw)
        for _ in range(2):   # capture, then replay
            gen = [torch.Generator("cuda").manual_seed(s) for s in (1, 2)]
            got = graphed.sample_tokens(2, num_iter=4, cfg=cfg, generator=gen, **kw)
            assert rel_err(got, want) <= 1e-5
    runners = list(graphed._graph_cache.values())
    assert runners and all(r.graphs is not None and r.replays > 0 for r in runners)


def test_generate_uses_the_model_defaults():
    model = engine.load("digits", backend="reference")
    assert model.sampling_defaults["num_iter"] == 8 and model.sampling_defaults["cfg"] == 2.0
    got = engine.generate(model, [3, 4], generator=gens([0, 1]), output_type="np")
    want = engine.generate(model, [3, 4], generator=gens([0, 1]), output_type="np", num_iter=8,
                           cfg=model.sampling_defaults["cfg"],
                           cfg_schedule=model.sampling_defaults.get("cfg_schedule", "linear"),
                           temperature=model.sampling_defaults.get("temperature", 1.0))
    assert got.shape == (2, 16, 16, 1) and np.array_equal(got, want)
    other = engine.generate(model, [3, 4], generator=gens([0, 1]), output_type="np", num_iter=2)
    assert not np.array_equal(other, got)
