"""Outputs of the published MAR code for configurations beyond the golden one (patch size 2,
unequal widths, buffer 0/1, 1000 classes, ddim / sectioned respacings), reproduced by every
backend. See tests/data/published/make_published_outputs.py for how they were recorded."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import engine
from engine.backends import available_backends
from helpers import rel_err

DATA = Path(__file__).resolve().parents[2] / "data" / "published"
RUNS = json.loads((DATA / "runs.json").read_text())
TOKENS = load_file(str(DATA / "tokens.safetensors"))


# Triton runs in its (slow) interpreter here: one configuration, with CFG runs and patch size 2.
CASES = [(name, backend) for backend in available_backends("cpu") for name in ("p2", "sec", "buf1")]
CASES += [("p2", "triton")]


@pytest.mark.parametrize("name,backend", CASES)
def test_published_outputs(name, backend):
    model = engine.load(DATA / f"ck_{name}.pth", backend=backend)
    for k, run in enumerate(RUNS):
        torch.manual_seed(100 + k)
        np.random.seed(100 + k)
        got = model.sample_tokens(run["bsz"], run["num_iter"], run["cfg"], run["cfg_schedule"],
                                  run["labels"], run["temperature"])
        assert rel_err(got, TOKENS[f"{name}.{k}"]) <= 1e-4, (name, k)
