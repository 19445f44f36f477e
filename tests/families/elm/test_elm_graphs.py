"""ELM's decode on the device: the fused sampling kernel in decode_step (backend "triton": CUDA,
or CPU in Triton's interpreter) and the CUDA-graph decode runner (engine/core/runners.py), checked
against the published tokens (tests/data/elm goldens) and the eager engine path."""
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import engine
from engine.core.counting import count_ops
from engine.families.elm import ELMModel
from engine.core.runners import DecodeStep, decode_graph_runner

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:(invalid value|divide by zero) encountered:RuntimeWarning")]

DATA = Path(__file__).resolve().parents[2] / "data" / "elm"
META = json.loads((DATA / "runs.json").read_text())
GOLD = load_file(str(DATA / "tokens.safetensors"))
RUNS = {r["name"]: r for r in META["runs"]}
SIZES = {"a": dict(n_head=4, block_size=16), "b": dict(n_head=2, n_kv_head=1, block_size=64, norm_eps=1e-6,
                                                        rope_base=500.0),
         "c": dict(n_head=2, block_size=16, cls_token_num=2)}
KERNEL = os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
KERNEL_DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


def load(name, device="cpu", **kw):
    return engine.load(DATA / f"ck_{name}.pth", family="elm-ar", device=device, **SIZES[name], **kw)


def generate_cfg(model, name):
    run = RUNS[name]
    torch.manual_seed(run["seed"])
    return model.generate_cfg(None, torch.tensor(run["cond"]), run["num_iter"], temperature=run["temperature"],
                              top_k=run["top_k"], cfg_scale=run["cfg_scale"], cfg_schedule=run["cfg_schedule"])


def check_golden(model, name):
    tokens, logits = generate_cfg(model, name)
    assert torch.equal(tokens.cpu(), GOLD[f"{name}.tokens"]), f"{name}: tokens differ from the published ones"
    gold = GOLD[f"{name}.logits"]
    assert torch.equal(torch.isinf(logits.cpu()), torch.isinf(gold))
    torch.testing.assert_close(logits.cpu()[torch.isfinite(gold)], gold[torch.isfinite(gold)], rtol=1e-4, atol=1e-4)


# The fused kernel in decode_step ---------------------------------------------------------------
@pytest.mark.skipif(not KERNEL, reason="the Triton kernel needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("name", ["a_linear", "c_sqrt"])   # top-k + cfg schedule; token_each 1, temperature
def test_fused_sampling_gives_the_published_tokens(name):
    from engine.kernels.utils import LAUNCHES

    model = load(RUNS[name]["config"], KERNEL_DEVICE, backend="triton", cuda_graphs=False)
    assert model.backend_name == "triton" and model.fused_sampling
    before = LAUNCHES["categorical_sample"]
    check_golden(model, name)
    assert LAUNCHES["categorical_sample"] - before == RUNS[name]["num_iter"]   # one launch per step


@pytest.mark.skipif(not KERNEL, reason="the Triton kernel needs CUDA or TRITON_INTERPRET=1")
def test_fused_decode_step_compiles_fullgraph_without_host_syncs():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = load("b", KERNEL_DEVICE, backend="triton")
    c, m, dev = model.config, model.module, KERNEL_DEVICE
    labels = torch.tensor([1, 2, 5, 5], device=dev)            # [cond; null] for two images
    caches = [m.new_cache(4), m.new_cache(4)]
    for cache in caches:
        m.prefill(labels, None, cache)
    prev = torch.tensor([[3, 7], [1, 2]], device=dev)
    scale, temperature = torch.tensor([2.0, 3.5], device=dev), torch.tensor([1.0, 0.9], device=dev)
    counter = CompileCounter()
    compiled = torch.compile(model.decode_step, fullgraph=True, backend=counter, dynamic=False)
    gen = torch.Generator().manual_seed(0)
    for pos in (1, 2):
        noise = torch.empty(2, c.token_each, c.vocab_size).exponential_(1, generator=gen).to(dev)
        input_pos = torch.tensor([pos], device=dev)
        got = compiled(prev, input_pos, caches[0], scale, temperature, 5, 0.9, noise)
        want, counts = count_ops(model.decode_step, prev, input_pos, caches[1], scale, temperature, 5, 0.9, noise)
        assert counts.host_syncs == 0 and counts.counts["engine.categorical_sample.default"] == 1
        assert not any(op.startswith(("aten.sort", "aten.topk", "aten.cumsum")) for op in counts.counts)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and bool(got[2])
        prev = got[0]
    assert counter.frame_count == 1


def test_triton_where_it_cannot_run_falls_back_with_the_reason(monkeypatch):
    """backend="triton" on CPU without the interpreter: a RuntimeWarning naming why, then the
    torch path (the published tokens). "auto" on CPU: the torch path, silently."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.warns(RuntimeWarning, match="'triton' cannot run on cpu .*TRITON_INTERPRET=1"):
        model = load("a", backend="triton")
    assert model.backend_name == "reference" and not model.fused_sampling
    check_golden(model, "a_cfg1")
    assert load("a").backend_name == "reference"


# The CUDA-graph decode runner ---------------------------------------------------------------------
def use_runner(model, monkeypatch):
    """Route the model's decode steps through the graph runner (on CPU: its static buffers,
    the step run eagerly instead of replayed)."""
    monkeypatch.setattr(model, "decode_runner", lambda *args: decode_graph_runner(model, *args))


def test_graph_runner_host_side_gives_the_published_tokens(monkeypatch):
    model = load("a", backend="reference")
    use_runner(model, monkeypatch)
    check_golden(model, "a_linear")
    (runner,) = model._graph_cache.values()
    assert isinstance(runner, DecodeStep) and not runner.capture and runner.graph is None
    buffers = [t.data_ptr() for t in (runner.prev, runner.input_pos, runner.noise, runner.scale)]
    check_golden(model, "a_log")          # other cfg / temperature / top-k values: another runner ...
    check_golden(model, "a_linear")       # ... and the first one again, its buffers reused
    assert len(model._graph_cache) == 2 and model._graph_cache[next(iter(model._graph_cache))] is runner
    assert buffers == [t.data_ptr() for t in (runner.prev, runner.input_pos, runner.noise, runner.scale)]
    check_golden(model, "a_short")        # one image: a new cache, so new runners (the old ones go)
    assert runner not in model._graph_cache.values() and len(model._graph_cache) == 1


def test_graph_runner_host_side_matches_eager_sample_tokens(monkeypatch):
    """Per-image generators, cfg and temperatures; without CFG (no scale buffer)."""
    model = load("b", backend="reference")
    kw = dict(labels=[0, 3], cfg=[2.0, 3.0], cfg_schedule=["linear", "cos"], temperature=[1.0, 0.8], top_k=8,
              top_p=0.95)
    gens = lambda: [torch.Generator().manual_seed(s) for s in (11, 12)]  # noqa: E731
    eager = [model.sample_tokens(2, generator=gens(), **kw), model.sample_tokens(2, labels=[1, 2], generator=gens())]
    use_runner(model, monkeypatch)
    static = [model.sample_tokens(2, generator=gens(), **kw), model.sample_tokens(2, labels=[1, 2], generator=gens())]
    for a, b in zip(eager, static):
        assert torch.equal(a, b)
    assert {r.scale is None for r in model._graph_cache.values()} == {True}   # cfg 1: no null half


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_cuda_graphs_replay_the_eager_tokens(backend):
    graphed = load("b", "cuda", backend=backend, cuda_graphs=True)
    eager = load("b", "cuda", backend=backend, cuda_graphs=False)
    kw = dict(labels=[0, 3], cfg=[2.0, 3.0], temperature=[1.0, 0.8], top_k=8)
    for cfg in (1.0, 3.0):
        want = eager.sample_tokens(2, cfg=cfg, generator=[torch.Generator("cuda").manual_seed(s) for s in (1, 2)],
                                   **{k: v for k, v in kw.items() if k != "cfg"})
        for _ in range(2):   # capture, then replay
            got = graphed.sample_tokens(2, cfg=cfg, generator=[torch.Generator("cuda").manual_seed(s) for s in (1, 2)],
                                        **{k: v for k, v in kw.items() if k != "cfg"})
            assert torch.equal(got, want)
    runners = list(graphed._graph_cache.values())
    assert runners and all(r.capture and r.graph is not None and r.replays > 0 for r in runners)
    tokens, logits = generate_cfg(graphed, "b_linear")            # the global RNG, last logits
    want_tokens, want_logits = generate_cfg(eager, "b_linear")
    assert torch.equal(tokens, want_tokens) and torch.equal(logits, want_logits)
