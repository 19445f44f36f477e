"""Where a benchmark number comes from: the commit, whether the tree was clean, the CPU and the
thread count. Every results file records it (pytest-benchmark's extra_info, or a JSON field)."""
from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _git(*args) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_stamp() -> dict:
    # Results files written by earlier benchmarks of the same run do not make the code dirty.
    dirty = _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results")
    return {"commit": _git("rev-parse", "HEAD") or "unknown", "tree": "dirty" if dirty else "clean",
            "cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__}
