"""ELM AR sampling: the engine's KV-cached generate_cfg vs ELM's published generate_cfg (the whole
prefix [cond; null] recomputed at every step), same CPU, same random weights, same seed; the
tokens must be identical.

    python benchmarks/bench_elm.py                      # writes benchmarks/results/elm.json
    ELM=/tmp/elm python benchmarks/bench_elm.py         # baseline: the published code itself

(benchmarks/results/elm.json: `ELM=/tmp/elm ENGINE_BENCH_THREADS=1 python benchmarks/bench_elm.py
--repeats 2`, ~3 min on one core.)

Model: width 384, 6 layers, 6 heads, token_each 2, code_dim 10 (two 1024-way sub-tokens per
position), 1000 classes; random weights (RMSNorm gains 1 + 0.1 randn, heads 2 randn / sqrt(384),
the rest randn / sqrt(fan in)). Sampling: batch 1, cfg 2.0 constant, top-k 400, temperature 1.0
(ELM's inference.sh settings), one image of 64, 144 and 256 positions (8x8, 12x12, 16x16 grids).

Baseline: with ELM naming an extracted checkout of Pepper-lll/LMforImageGeneration, its
`llama/ar_model.py` Transformer is built with the same weights and its own generate_cfg timed
(einops, imported but unused there, gets a stand-in when missing). Without ELM, the published
loop is re-stated below in plain torch on the engine's module (whose forward is the published
full pass: every position, every head; tests/families/elm/test_elm.py checks it against the published
outputs).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stamp import machine_stamp  # noqa: E402

from engine.core.counting import count_ops  # noqa: E402
from engine.families.elm import ELMConfig, ELMModel, cfg_at  # noqa: E402
from engine.models.elm import ELMTransformer  # noqa: E402

MODEL = dict(dim=384, n_layer=6, n_head=6, token_each=2, code_dim=10, num_classes=1000)
SAMPLING = dict(cfg_scale=2.0, cfg_schedule="constant", top_k=400, temperature=1.0)
RESULTS = Path(__file__).resolve().parent / "results" / "elm.json"
FLOOR = 5.0


def random_module(block_size: int) -> ELMTransformer:
    module = ELMTransformer(ELMConfig(block_size=block_size, **MODEL))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * noise)
            elif name.startswith("output"):
                p.copy_(2 * noise / math.sqrt(MODEL["dim"]))
            else:
                p.copy_(noise / math.sqrt(p.shape[-1]))
    return module.eval()


@torch.no_grad()
def restated_generate_cfg(module, cond, num_iter, temperature=1.0, top_k=None, cfg_scale=10.0,
                          cfg_schedule="constant"):
    """ELM's generate_cfg loop in plain torch: the full prefix through the transformer each step."""
    t, v = module.token_each, module.vocab_size
    cond = torch.cat([cond, torch.full_like(cond, module.config.num_classes)])
    idx = None
    for step in range(num_iter):
        cfg = cfg_at(cfg_schedule, cfg_scale, step, num_iter)
        logits = module(None if idx is None else torch.cat([idx, idx]), cond)
        c, u = torch.split(logits, len(logits) // 2, dim=0)
        logits = (u + (c - u) * cfg)[:, -t:, :] / temperature
        if top_k is not None:
            kth, _ = torch.topk(logits, min(top_k, v))
            logits[logits < kth[:, :, [-1]]] = -float("inf")
        probs = F.softmax(logits, dim=-1)
        nxt = torch.cat([torch.multinomial(probs[:, i, :], num_samples=1) for i in range(t)], dim=1).unsqueeze(1)
        idx = nxt if idx is None else torch.cat((idx, nxt), dim=1)
    return idx, logits


def published_generate(block_size: int, module: ELMTransformer):
    """generate_cfg of ELM's own Transformer with the module's weights, or None without ELM."""
    root = os.environ.get("ELM")
    if not root:
        return None
    try:
        import einops  # noqa: F401
    except ImportError:   # ar_model imports rearrange / reduce / pack / unpack and never calls them
        sys.modules["einops"] = types.SimpleNamespace(rearrange=None, reduce=None, pack=None, unpack=None)
    sys.path.insert(0, root)
    from llama import ar_model

    published = ar_model.Transformer(ar_model.ModelArgs(block_size=block_size, **MODEL)).eval()
    published.load_state_dict(module.state_dict())
    return published.generate_cfg


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 144, 256])
    parser.add_argument("--repeats", type=int, default=3, help="engine rounds per length (the best is kept)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if os.environ.get("ENGINE_BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["ENGINE_BENCH_THREADS"]))
    cond = torch.tensor([207])
    rows, baseline_kind = [], "re-stated published loop (plain torch, full prefix each step)"
    for length in args.lengths:
        module = random_module(length)
        model = ELMModel(module)
        published = published_generate(length, module)
        if published is not None:
            baseline_kind = f"published llama/ar_model.py Transformer.generate_cfg ({os.environ['ELM']})"
            baseline = lambda: published(idx=None, cond=cond, num_iter=length, **SAMPLING)  # noqa: E731
        else:
            baseline = lambda: restated_generate_cfg(module, cond, length, **SAMPLING)  # noqa: E731
        torch.manual_seed(0)
        (want, _), base_s = timed(baseline)
        engine_times = []
        for _ in range(args.repeats):
            torch.manual_seed(0)
            (got, _), seconds = timed(model.generate_cfg, None, cond, length, **SAMPLING)
            engine_times.append(seconds)
            assert torch.equal(got, want), f"{length} positions: tokens differ from the baseline"
        row = dict(positions=length, grid=int(length ** 0.5), baseline_s=round(base_s, 3),
                   engine_s=round(min(engine_times), 4), engine_first_call_s=round(engine_times[0], 4),
                   ratio=round(base_s / min(engine_times), 2), identical_tokens=True)
        print(json.dumps(row), flush=True)
        rows.append(row)
    # Device operations per image (batch 1), at the shortest length.
    length = min(args.lengths)
    module = random_module(length)
    model = ELMModel(module)
    torch.manual_seed(0)
    _, engine_count = count_ops(model.generate_cfg, None, cond, length, **SAMPLING)
    torch.manual_seed(0)
    _, base_count = count_ops(restated_generate_cfg, module, cond, length, **SAMPLING)
    ops = dict(positions=length, engine_ops=engine_count.total, engine_host_syncs=engine_count.host_syncs,
               published_ops=base_count.total,
               published_host_syncs=(2 * MODEL["token_each"] + 1) * length,
               note="ops: top-level ATen dispatches per image (engine.counting). The engine's one host sync "
                    "is its NaN/Inf check after the last step. The published loop's syncs happen inside "
                    "torch.multinomial (2 .item() validity checks per call, token_each calls per step) and "
                    "the boolean-mask top-k assignment (1 per step), below what engine.counting sees; "
                    "counted here from the profiler (aten::item): 2 * token_each + 1 per step")
    print(json.dumps(ops))
    longest = max(rows, key=lambda r: r["positions"])
    result = dict(stamp=machine_stamp(), model=MODEL, sampling=dict(batch=1, **SAMPLING), baseline=baseline_kind,
                  rows=rows, op_counts=ops,
                  floor=dict(positions=longest["positions"], min_ratio=FLOOR, ratio=longest["ratio"],
                             met=longest["ratio"] >= FLOOR))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
