"""The native build says what it does: "compiling" only when it compiles, "loading" from the cache."""
import os
import shutil
import subprocess
import sys
import time

from engine.native import build


def test_what_load_does_follows_the_cache_state(tmp_path):
    src, cache = tmp_path / "src", tmp_path / "cache"
    src.mkdir()
    cache.mkdir()
    for name in build.SOURCES + build.HEADERS:
        (src / name).write_text("//")
    assert build._what_load_does("ext", cache, src).startswith("compiling")
    so = cache / "ext.so"
    so.write_bytes(b"")
    newest = max((src / n).stat().st_mtime for n in build.SOURCES)
    os.utime(so, (newest + 10, newest + 10))
    assert build._what_load_does("ext", cache, src).startswith("loading")
    os.utime(src / "head_loop.cpp", (newest + 20, newest + 20))   # a source changed since
    assert build._what_load_does("ext", cache, src).startswith("compiling")
    (cache / "lock").write_text("")
    assert build._what_load_does("ext", cache, src).startswith("waiting for another process")


def test_a_cached_build_loads_without_claiming_to_compile(native_ext, tmp_path):
    # Imported straight from the cache: silent (a user error stays one line); through torch's
    # loader it says "loading", never "compiling". A private copy of the built cache, so no
    # other process's build (or its lock) in the shared one can interfere.
    built = build.build_dir()
    private = tmp_path / "cache"
    shutil.copytree(built, private / built.relative_to(build.cache_root()),
                    ignore=shutil.ignore_patterns("lock"))
    # A fresh checkout's sources can be newer than a library cached by an earlier run (same
    # contents, same key): then ninja would really recompile and "compiling" would be true. Make
    # the copy newer than the sources so the test states the cached case whatever the clone's age.
    now = time.time()
    for path in private.rglob("*"):
        os.utime(path, (now, now))
    env = {**os.environ, "ENGINE_CACHE_DIR": str(private)}
    code = "from engine.native.build import load_extension; load_extension()"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    code = ("import engine.native.build as b; b._import_built = lambda name, d: None; "
            "b.load_extension()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "loading the native CPU head loop from the cache" in proc.stderr
    assert "compiling" not in proc.stderr
