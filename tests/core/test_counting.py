"""Device operations per sample_tokens call: the engine's Triton path (run in Triton's
interpreter) against the published sampler, counted on the same golden configuration.

The published counts were measured with engine.core.counting on the published code itself
(tests/data/published/pub_counts.json); the re-statement of the published loop in helpers.py is
counted live as a cross-check that the two counts are of the same kind."""
import json
from pathlib import Path

import numpy as np
import torch

import engine
from engine.core.counting import count_ops
from helpers import CHECKPOINT, spec_sample_tokens

PUBLISHED = json.loads((Path(__file__).resolve().parents[1] / "data" / "published" / "pub_counts.json").read_text())


def test_triton_path_needs_a_tenth_of_the_published_operations():
    bsz, num_iter, cfg = 1, 8, 3.0
    model = engine.load(CHECKPOINT, backend="triton")
    torch.manual_seed(0)
    np.random.seed(0)
    _, engine_count = count_ops(model.sample_tokens, bsz, num_iter, cfg, "linear", [0], 1.0)
    torch.manual_seed(0)
    np.random.seed(0)
    _, spec_count = count_ops(spec_sample_tokens, model.mar, bsz, num_iter, cfg, "linear", [0], 1.0)
    published = PUBLISHED[f"{bsz},{num_iter},{cfg}"]
    assert abs(spec_count.total - published["total"]) < 0.25 * published["total"]
    # One host sync per call, after the last step: the check that no token is NaN/Inf.
    assert published["syncs"] > 0 and engine_count.host_syncs == 1
    assert engine_count.total * 10 <= published["total"], (engine_count.total, published["total"])
    # depth + 3 fused launches per diffusion step, one cond_embed per MAR step.
    depth, steps = model.config.diffloss_d, model.head.num_steps
    fused = sum(n for op, n in engine_count.counts.items() if op.startswith("engine."))
    assert fused == num_iter * (steps * (depth + 3) + 1)


LIGHTGEN = json.loads((Path(__file__).resolve().parents[1] / "data" / "lightgen" / "pub_counts.json").read_text())


def test_fluid_needs_fewer_operations_than_lightgen_and_no_host_sync():
    """Counted on LightGen's own sample_tokens (tests/data/lightgen/pub_counts.json, config p1,
    batch 1, 8 steps, cfg 3) against the engine's reference path on the same checkpoint."""
    data = Path(__file__).resolve().parents[1] / "data" / "lightgen"
    model = engine.load(data / "ck_p1.pth", ema=True, backend="reference")
    texts = torch.randn(1, 6, 24, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(0)
    np.random.seed(0)
    _, counter = count_ops(model.sample_tokens, 1, num_iter=8, cfg=3.0, texts=texts, height=256, width=256)
    published = LIGHTGEN["p1,bsz1,iter8,cfg3.0"]
    # Two host syncs per call, outside the steps: the texts' and the tokens' NaN/Inf checks.
    assert published["syncs"] == 48 and counter.host_syncs == 2
    assert counter.total < published["total"], (counter.total, published["total"])
