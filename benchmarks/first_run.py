"""What a newcomer waits for: README's main command timed in a fresh clone and virtual environment.

    python benchmarks/first_run.py [--out benchmarks/results/first_run.json]

Clones this repository's HEAD into a temporary directory, then times, with an empty engine cache
(ENGINE_CACHE_DIR points into the temporary directory): creating the virtual environment and
installing (`pip install torch==2.13.0 && pip install -e ".[text]"`, from the local package
index / wheel cache, as on the development machine), the first `python -m engine sample` (which
builds the native extension once), the text-to-image sample of the main command, and a second
digits sample (cache warm). Writes the seconds of each part with the machine stamp.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stamp import ROOT, machine_stamp  # noqa: E402


# The text-to-image half of README's main command.
TEXT_SAMPLE = ('python -m engine sample --checkpoint digits-text --prompt "a 3 to the left of a 7" '
               '--prompt "two fives" --prompt "an eight on the right" --out text.png')


def timed(cmd: str, cwd: Path, env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(["bash", "-c", cmd], cwd=cwd, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "first_run.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        clone = Path(tmp) / "main"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        env = dict(os.environ, ENGINE_CACHE_DIR=str(Path(tmp) / "cache"))
        env.pop("VIRTUAL_ENV", None)
        activate = ". .venv/bin/activate && "
        install = timed("python3 -m venv .venv && " + activate
                        + "pip install -q torch==2.13.0 && pip install -q -e '.[text]'", clone, env)
        first = timed(activate + "python -m engine sample --out digits.png", clone, env)
        text = timed(activate + TEXT_SAMPLE, clone, env)
        second = timed(activate + "python -m engine sample --out digits.png", clone, env)
    result = {"stamp": machine_stamp(), "install_s": round(install, 1),
              "first_sample_s": round(first, 1), "text_sample_s": round(text, 1),
              "second_sample_s": round(second, 1), "total_s": round(install + first + text, 1)}
    print(json.dumps(result, indent=1))
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
