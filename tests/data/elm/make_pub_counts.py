"""How pub_counts.json beside this script was made: device operations and host syncs of the
PUBLISHED ELM `Transformer.generate_cfg` (github Pepper-lll/LMforImageGeneration, commit
c2f29f0ac9775dd917f315f0ff18f00d42b97f7a, `llama/ar_model.py`) on the golden checkpoints
ck_a.pth / ck_b.pth, counted with the engine's own counter (engine/core/counting.py: every non-view
ATen op dispatched; .item() / bool(tensor) / nonzero as host syncs). Not run by the tests (it
needs the published code); benchmarks/op_counts.py reads the file.

Run (CPU, torch 2.13.0+cpu, numpy, tqdm; a plain venv, 1 thread):
    ELM=/tmp/elm python tests/data/elm/make_pub_counts.py
where /tmp/elm is an extracted checkout of the published repository (imported from there; nothing
of it is copied here). Keys: "<config>,bsz<B>,iter<N>,cfg<s>,<schedule>,topk<k>", values
{"total": operations, "syncs": host syncs, "syncs_inside_ops": ...}, for one
generate_cfg(None, cond, N, top_k=k, cfg_scale=s, cfg_schedule=schedule) call after
torch.manual_seed(0), eval(), no_grad. The counter sees the ops Python dispatches; the published
loop's syncs happen inside them (torch.multinomial's two `.item()` validity checks per call, the
boolean-mask top-k assignment's nonzero), so "syncs_inside_ops" counts the
aten::_local_scalar_dense and aten::nonzero events torch.profiler records at every depth.
"""
import importlib.util
import json
import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
ELM = Path(os.environ.get("ELM", "/tmp/elm"))
torch.set_num_threads(1)

# The calls benchmarks/op_counts.py makes (one image each: num_iter = block_size).
CALLS = [("a", [0], 16, 4.0, "linear", 5), ("b", [1], 64, 1.5, "linear", 10)]


def counter_module():
    """engine/core/counting.py alone (it needs torch only; the engine package is not installed here)."""
    spec = importlib.util.spec_from_file_location("engine_counting", ROOT / "engine" / "core" / "counting.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@torch.no_grad()
def main():
    sys.path.insert(0, str(ELM))
    from llama import ar_model

    configs = json.loads((HERE / "runs.json").read_text())["configs"]
    count_ops = counter_module().count_ops
    counts = {}
    for name, cond, num_iter, cfg, schedule, top_k in CALLS:
        model = ar_model.Transformer(ar_model.ModelArgs(**configs[name])).eval()
        model.load_state_dict(torch.load(HERE / f"ck_{name}.pth", weights_only=True))
        torch.manual_seed(0)
        _, c = count_ops(model.generate_cfg, None, torch.tensor(cond), num_iter, top_k=top_k, cfg_scale=cfg,
                         cfg_schedule=schedule)
        torch.manual_seed(0)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            model.generate_cfg(None, torch.tensor(cond), num_iter, top_k=top_k, cfg_scale=cfg,
                               cfg_schedule=schedule)
        inside = sum(e.name in ("aten::_local_scalar_dense", "aten::nonzero") for e in prof.events())
        key = f"{name},bsz{len(cond)},iter{num_iter},cfg{cfg},{schedule},topk{top_k}"
        counts[key] = {"total": c.total, "syncs": c.host_syncs, "syncs_inside_ops": inside}
        print(key, counts[key])
    (HERE / "pub_counts.json").write_text(json.dumps(counts) + "\n")


if __name__ == "__main__":
    main()
