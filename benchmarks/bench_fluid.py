"""Fluid text-to-image `sample_tokens`: LightGen's own sampler vs the engine, same CPU, same
weights, same seed, same tokens.

    LIGHTGEN=/path/to/LightGen python -m pytest benchmarks/bench_fluid.py --benchmark-enable \
        --benchmark-group-by=group --benchmark-json=benchmarks/results/fluid.json

The model is `tests/data/lightgen/bench_config.json`: encoder / decoder / cross stacks 6 x 384
(6 heads), text aligner 2 x 384 over 32 x 512 caption embeddings, a MAR-B-sized head 6 x 1024,
256 px at stride 16 (256 tokens of 16 channels), 100 diffusion steps; batch 1, cfg 4.0 constant,
num_iter 16 (ENGINE_BENCH_FLUID_ITERS), random weights (LightGen's init, then +0.05 randn).
LIGHTGEN names a checkout of XianfengWu01/LightGen (needs timm and scipy; its `.cuda()` calls are
made no-ops and, when torchvision is missing, timm's unused torchvision imports get a stand-in).
Without LIGHTGEN the LightGen round is skipped and the same weights are built by the engine.
Every engine round's tokens are compared with LightGen's (or the reference's) round:
extra_info "rel_err_vs_lightgen"; float32 must be within 1e-4, bf16 within 0.1.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import engine
from published_env import torchvision_standin  # noqa: E402
from stamp import machine_stamp
from engine.families.fluid import FluidConfig, FluidModel
from engine.models.fluid import Fluid

CONFIG = json.loads((Path(__file__).parents[1] / "tests" / "data" / "lightgen" / "bench_config.json").read_text())
ITERS = int(os.environ.get("ENGINE_BENCH_FLUID_ITERS", CONFIG["sample_tokens"]["num_iter"]))
BACKENDS = ("lightgen", "reference", "native", "native-bf16")
_tokens: dict = {}
if os.environ.get("ENGINE_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["ENGINE_BENCH_THREADS"]))


def lightgen_model():
    """LightGen's FLUID with the benchmark weights, or None without LIGHTGEN."""
    root = os.environ.get("LIGHTGEN")
    if not root:
        return None
    import functools

    import torch.nn as nn

    torch.Tensor.cuda = lambda self, *a, **k: self
    nn.Module.cuda = lambda self, *a, **k: self
    torchvision_standin()
    sys.path.insert(0, root)
    from models.fluid_arbitrary import FLUID  # the published code

    torch.manual_seed(0)
    model = FLUID(norm_layer=functools.partial(nn.LayerNorm, eps=1e-6), **CONFIG["constructor"])
    with torch.no_grad():
        torch.manual_seed(1)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def models():
    published = lightgen_model()
    if published is not None:
        return published, engine.accelerate(published, backend="reference")
    torch.manual_seed(1)
    fluid = Fluid(FluidConfig.from_dict(CONFIG["constructor"]))
    with torch.no_grad():   # LayerNorm gains near 1, everything else small and random
        for name, p in fluid.named_parameters():
            is_gain = p.dim() == 1 and "norm" in name and name.endswith("weight")
            p.copy_((1.0 if is_gain else 0.0) + 0.05 * torch.randn_like(p))
    return None, FluidModel(fluid, backend="reference")


@pytest.mark.parametrize("backend", BACKENDS)
def test_fluid_sample_tokens(benchmark, models, backend):
    published, model = models
    if backend == "lightgen" and published is None:
        pytest.skip("set LIGHTGEN to a LightGen checkout to time the published sampler")
    s = CONFIG["sample_tokens"]
    texts = torch.randn(1, CONFIG["constructor"]["max_length"], CONFIG["constructor"]["caption_channels"],
                        generator=torch.Generator().manual_seed(3))
    kwargs = dict(num_iter=ITERS, cfg=s["cfg"], cfg_schedule=s["cfg_schedule"], texts=texts,
                  temperature=s["temperature"], height=s["height"], width=s["width"])
    if backend == "lightgen":
        sample = published.sample_tokens
    else:
        precision = "bf16" if backend.endswith("-bf16") else "fp32"
        sample = FluidModel(model.mar, backend=backend.removesuffix("-bf16"), precision=precision).sample_tokens

    def run():
        torch.manual_seed(0)
        np.random.seed(0)
        with torch.no_grad():
            return sample(1, **kwargs)

    benchmark.group = f"Fluid sample_tokens bsz=1 cfg={s['cfg']} num_iter={ITERS} steps=100 256px"
    benchmark.extra_info.update(backend=backend, num_iter=ITERS,
                                **machine_stamp())
    out = benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    if backend == "lightgen" or (backend == "reference" and published is None):
        _tokens["baseline"] = out
        return
    ref = _tokens["baseline"].double()
    err = float((out.double() - ref).norm() / ref.norm())
    benchmark.extra_info["rel_err_vs_lightgen" if published is not None else "rel_err_vs_reference"] = err
    assert err <= (1e-4 if not backend.endswith("-bf16") else 0.1), err
