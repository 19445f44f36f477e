"""Lazy build of the native CPU head loop (`csrc/head_loop.cpp`, installed as `engine.csrc`).

Nothing here runs at import. `load_extension()` compiles the sources on first use with
`torch.utils.cpp_extension.load` (ninja, -O3, OpenMP, tuned for the CPU it runs on) into a build
directory under the user cache that is keyed by the sources, the flags, torch, Python and the CPU,
so a build is reused by later processes and never shared between incompatible setups. Concurrent
builds of the same key are serialised by torch's lock file in that directory; in-process callers
share one attempt. When the build cannot happen (no compiler, no ninja, a compile error) the
failure is remembered and `build_error()` names its cause; `NativeBuildError` carries it.

Environment:
  ENGINE_NATIVE=0           never build; the native backend reports itself unavailable
  ENGINE_CACHE_DIR          cache root (default $XDG_CACHE_HOME/engine or ~/.cache/engine)
  ENGINE_NATIVE_ARCH_FLAGS  replaces the default "-march=native" (e.g. "" or "-march=x86-64-v3")
  ENGINE_NATIVE_VERBOSE=1   show the compiler's output
  CXX                       the C++ compiler torch's extension tools use
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.machinery
import importlib.util
import os
import platform
import shlex
import shutil
import sys
import threading
import time
from pathlib import Path

SOURCES = ("head_loop.cpp", "small_gemm.cpp", "attention.cpp", "bindings.cpp")  # compiled in parallel by ninja
HEADERS = ("head_loop.h", "small_gemm.h", "attention.h", "vec16.h")
BASE_CFLAGS = ("-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-DNDEBUG")
LDFLAGS = ("-fopenmp",)
STALE_LOCK_SECONDS = 15 * 60

_lock = threading.Lock()
_module = None
_error: str | None = None


class NativeBuildError(RuntimeError):
    """The native extension could not be built or loaded; the message names the cause."""


def source_dir() -> Path:
    """The C++ sources: the checkout's csrc/ beside the imported engine package where there is
    one (a second checkout on PYTHONPATH builds its own sources, not an editable install's),
    else the installed engine.csrc package."""
    # This file is engine/native/build.py: parents[1] is the engine package, parents[2] what holds it.
    beside = Path(__file__).resolve().parents[2] / "csrc"
    if (beside / "head_loop.cpp").is_file():
        return beside
    # By name: a data package only, importing nothing of the engine's (not the package root).
    csrc = importlib.import_module("engine.csrc")

    return Path(csrc.__file__).resolve().parent


def cache_root() -> Path:
    root = os.environ.get("ENGINE_CACHE_DIR")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "engine"


def arch_flags() -> list[str]:
    value = os.environ.get("ENGINE_NATIVE_ARCH_FLAGS")
    if value is not None:
        return shlex.split(value)
    return ["-march=native"]


def cflags() -> list[str]:
    return list(BASE_CFLAGS) + arch_flags()


def _cpu_fingerprint() -> str:
    parts = [platform.machine(), platform.system()]
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key in ("model name", "flags", "Features", "CPU part"):
                    parts.append(line.strip())
                    if len(parts) > 6:
                        break
    except OSError:
        parts.append(platform.processor())
    return "|".join(parts)


def build_key() -> str:
    import torch

    h = hashlib.sha256()
    src = source_dir()
    for name in SOURCES + HEADERS:
        h.update(name.encode())
        h.update((src / name).read_bytes())
    for part in (torch.__version__, sys.version, " ".join(cflags()), " ".join(LDFLAGS),
                 os.environ.get("CXX", ""), _cpu_fingerprint()):
        h.update(b"\0" + part.encode())
    return h.hexdigest()[:16]


def module_name() -> str:
    return f"engine_native_{build_key()}"


def build_dir() -> Path:
    return cache_root() / "native" / module_name()


def _precheck() -> str | None:
    """A cause that makes building pointless, found without running the compiler."""
    flag = os.environ.get("ENGINE_NATIVE", "").strip().lower()
    if flag in ("0", "false", "no", "off"):
        return "disabled by ENGINE_NATIVE=0"
    try:
        import torch.utils.cpp_extension as cpp
    except Exception as exc:  # pragma: no cover - torch without its extension tools
        return f"torch.utils.cpp_extension is unavailable ({exc})"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler found (looked for {compiler!r}; install g++/clang++ or set CXX)"
    if not cpp.is_ninja_available():
        return "the ninja build tool is not installed (pip install ninja)"
    return None


def _summarize(exc: BaseException, log_path: Path | None) -> str:
    text = str(exc)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower() and "error building extension" not in ln.lower()]
    head = errors[0] if errors else (lines[0] if lines else type(exc).__name__)
    if len(head) > 300:
        head = head[:300] + "..."
    where = f"; full log: {log_path}" if log_path is not None else ""
    return f"building the C++ extension failed: {head}{where}"


def _import_built(name: str, directory: Path):
    path = directory / f"{name}.so"
    if not path.is_file():
        return None
    loader = importlib.machinery.ExtensionFileLoader(name, str(path))
    spec = importlib.util.spec_from_file_location(name, str(path), loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    sys.modules[name] = module
    return module


def _say(message: str) -> None:
    print(f"engine: {message}", file=sys.stderr, flush=True)


def _what_load_does(name: str, directory: Path, src: Path) -> str:
    """What `cpp.load` is about to do, in words: compiling is a one-time cost (~30 s) the user
    should not mistake for a hang; anything else must not claim to compile."""
    lock = directory / "lock"
    if lock.exists():
        return "waiting for another process that is compiling the native CPU head loop"
    built = directory / f"{name}.so"
    inputs = [src / f for f in SOURCES + HEADERS if (src / f).exists()]
    if built.is_file() and all(built.stat().st_mtime >= f.stat().st_mtime for f in inputs):
        return "loading the native CPU head loop from the cache"
    return "compiling the native CPU head loop once (~30 s on 2 cores, then cached)"


def _compile(name: str, directory: Path):
    import torch  # noqa: F401  (the extension links against torch's libraries)
    import torch.utils.cpp_extension as cpp

    directory.mkdir(parents=True, exist_ok=True)
    lock = directory / "lock"
    try:  # a build killed mid-way leaves torch's lock file behind; do not wait on it forever
        if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_SECONDS:
            lock.unlink()
    except OSError:
        pass
    src = source_dir()
    if not lock.exists():
        try:
            module = _import_built(name, directory)
            if module is not None:   # the common case, in milliseconds: nothing to say
                return module
        except ImportError:  # a stale or partial library: rebuild it below, from scratch
            (directory / f"{name}.so").unlink(missing_ok=True)
    _say(f"{_what_load_does(name, directory, src)} ({directory}; ENGINE_NATIVE=0 skips it)")
    return cpp.load(
        name=name,
        sources=[str(src / s) for s in SOURCES],
        extra_cflags=cflags(),
        extra_ldflags=list(LDFLAGS),
        extra_include_paths=[str(src)],
        build_directory=str(directory),
        verbose=os.environ.get("ENGINE_NATIVE_VERBOSE", "") not in ("", "0"),
    )


def load_extension():
    """The compiled module (built on first call); raises NativeBuildError naming the cause."""
    global _module, _error
    if _module is not None:
        return _module
    if _error is not None:
        raise NativeBuildError(_error)
    with _lock:
        if _module is not None:
            return _module
        if _error is not None:
            raise NativeBuildError(_error)
        cause = _precheck()
        if cause is None:
            directory = None
            try:
                name = module_name()
                directory = build_dir()
                _module = _compile(name, directory)
                return _module
            except Exception as exc:
                log = None
                if directory is not None:
                    try:
                        directory.mkdir(parents=True, exist_ok=True)
                        log = directory / "build-error.log"
                        log.write_text(f"{type(exc).__name__}: {exc}\n", encoding="utf-8")
                    except OSError:
                        log = None
                cause = _summarize(exc, log)
        _error = cause
        raise NativeBuildError(cause)


def build_error() -> str | None:
    """None when the extension loads (building it if needed), else the cause of the failure."""
    try:
        load_extension()
    except NativeBuildError as exc:
        return str(exc)
    return None


def extension_or_none():
    """The compiled module (building it if needed), or None when it cannot build or load: for
    callers with a pure-torch fallback."""
    try:
        return load_extension()
    except NativeBuildError:
        return None


def reset() -> None:
    """Forget the cached result (tests; a retry after installing a compiler)."""
    global _module, _error
    with _lock:
        _module = None
        _error = None
