import os

import torch

# Triton kernels run in the interpreter on machines without a GPU; a GPU machine runs the real
# kernels. A value the user set is kept. This must be decided before anything imports triton
# (importing torch and asking for CUDA does not), so it lives here, at collection time.
CUDA = torch.cuda.is_available()
if "TRITON_INTERPRET" not in os.environ and not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

GOLDEN_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "golden" / "mar_small"


def rel_err(a, b) -> float:
    """Relative error ||a - b|| / ||b|| in float64 (tensors or arrays; ||b|| clamped at 1e-30)."""
    a = torch.as_tensor(a).detach().double().cpu()
    b = torch.as_tensor(b).detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.fixture(name="rel_err", scope="session")
def rel_err_fixture():
    """The `rel_err(a, b)` function above, for tests that take it as a fixture."""
    return rel_err


@pytest.fixture(scope="session")
def device() -> str:
    """The device tests run on: "cuda" where a CUDA device is available, else "cpu"."""
    return "cuda" if CUDA else "cpu"


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    assert GOLDEN_DIR.is_dir(), f"golden outputs not found at {GOLDEN_DIR} (../shared beside the checkout)"
    return GOLDEN_DIR


@pytest.fixture(scope="session")
def native_ext():
    """The native extension (built once per machine); a failure where CI requires it."""
    from engine.native import build as native_build

    cause = native_build.build_error()
    if cause is not None:
        if os.environ.get("ENGINE_REQUIRE_NATIVE", "") not in ("", "0"):
            pytest.fail(f"native extension unavailable: {cause}")
        pytest.skip(f"native extension unavailable: {cause}")
    return native_build.load_extension()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny shapes run faster on one thread, and on a shared machine two OpenMP threads can stall
    each other for milliseconds per op. Modules opt in with pytest.mark.usefixtures."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ckpt():
    """The golden checkpoint's contents, read by the engine's own weights-only reader (a
    `safe_globals` block here would withdraw the process-wide argparse.Namespace allowance)."""
    from engine.loading import read_torch_file

    return read_torch_file(GOLDEN_DIR / "checkpoint-last.pth")
