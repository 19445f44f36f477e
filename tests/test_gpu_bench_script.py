"""The GPU benchmark script runs end to end in its dry mode, so it cannot rot."""
import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_bench.py"


def test_gpu_bench_dry_run(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("gpu_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.main(["--dry", "--json", str(tmp_path / "out.json")])
    assert {r["batch"] for r in rows} == {1, 2}
    assert all(r["seconds"] > 0 for r in rows)
    assert json.loads((tmp_path / "out.json").read_text()) == rows
    assert "| mar_base | 1 | published-style eager |" in capsys.readouterr().out
