"""engine.core.cpu_memory: after keep_large_allocations, a loop of large op outputs reuses freed heap
memory (no fresh pages to fault in); ENGINE_MALLOC_TUNE=0 leaves glibc's defaults, under which
every output is a fresh mmap. Each case runs in a fresh process: malloc settings are per process."""
import os
import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent("""
    import resource, torch
    from engine.core.cpu_memory import keep_large_allocations
    applied = keep_large_allocations()
    torch.set_num_threads(1)                 # one arena: the heap settles the same way every run
    x = torch.ones(16 << 20)                 # 64 MB: above glibc's largest default mmap threshold
    for _ in range(16):  # glibc settles within a few (64-byte aligned blocks coalesce)
        y = x * 2; del y
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(8):
        y = x * 2; del y
    print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def run_probe(env_value):
    env = dict(os.environ)
    env.pop("ENGINE_MALLOC_TUNE", None)
    if env_value is not None:
        env["ENGINE_MALLOC_TUNE"] = env_value
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env,
                         check=True).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings: Linux only")
def test_large_op_outputs_stop_faulting_in_fresh_pages():
    pages = (64 << 20) // 4096
    applied, tuned = run_probe(None)
    untouched, default = run_probe("0")
    assert applied and not untouched
    assert default >= 7 * pages          # glibc's defaults: every 64 MB output is fresh pages
    assert tuned < pages                 # tuned: freed blocks are reused (no fresh output)


def test_the_native_backend_applies_it(native_ext, monkeypatch):
    import engine
    from engine.core import cpu_memory
    from helpers import CHECKPOINT

    calls = []
    monkeypatch.setattr(cpu_memory, "keep_large_allocations", lambda: calls.append(1) or True)
    engine.load(CHECKPOINT, backend="native")
    assert calls
    calls.clear()
    engine.load(CHECKPOINT, backend="reference")   # the published-equivalent path: untouched
    assert not calls
