import os

# Triton kernels run in the interpreter on machines without a GPU. This must be set before
# anything imports triton, so it lives here, at collection time.
os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

GOLDEN_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "golden" / "mar_small"


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    assert GOLDEN_DIR.is_dir(), f"golden outputs not found at {GOLDEN_DIR} (../shared beside the checkout)"
    return GOLDEN_DIR


@pytest.fixture(scope="module")
def one_thread():
    """Tiny shapes run faster on one thread, and on a shared machine two OpenMP threads can stall
    each other for milliseconds per op. Modules opt in with pytest.mark.usefixtures."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
