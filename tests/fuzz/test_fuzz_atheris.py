"""The atheris harness (atheris_readers.py), bounded: a few hundred coverage-guided inputs over the
checkpoint readers must find no crash (ENGINE_FUZZ_RUNS raises the count for runs by hand)."""
import os
import subprocess
import sys
from pathlib import Path

HARNESS = Path(__file__).with_name("atheris_readers.py")


def test_atheris_finds_no_crash_in_the_readers(tmp_path):
    runs = os.environ.get("ENGINE_FUZZ_RUNS", "1000")
    # -report_slow_units: the first input may compile the native extension (a minute), not a finding;
    # -rss_limit_mb: torch alone can hold libFuzzer's default 2 GB; an input that takes more than
    # 8 GB to read is a finding
    proc = subprocess.run([sys.executable, str(HARNESS), f"-runs={runs}", "-seed=1", "-report_slow_units=600",
                           "-rss_limit_mb=8192",
                           f"-artifact_prefix={tmp_path}/"], capture_output=True, text=True, timeout=600,
                          cwd=HARNESS.parent)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"Done {runs} runs" in proc.stderr, proc.stderr[-2000:]
    assert not list(tmp_path.iterdir()), "atheris wrote a crash artifact"
