"""modulated_layernorm kernel vs its torch reference (interpreter on CPU, or a GPU)."""
import os

import pytest
import torch

from engine.kernels.modulated_layernorm import modulated_layernorm, modulated_layernorm_ref

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("rows", [1, 3, 17, 64])
@pytest.mark.parametrize("width", [64, 80, 96, 1024])
@pytest.mark.parametrize("affine", [True, False])
def test_matches_reference(rows, width, affine):
    g = torch.Generator().manual_seed(rows * 1000 + width)
    h = (torch.randn(rows, width, generator=g) * 3 + 1).to(DEVICE)
    mods = torch.randn(rows, 3 * width, generator=g).to(DEVICE)   # shift/scale are strided views
    shift, scale = mods[:, :width], mods[:, 2 * width:]
    w = (1 + 0.1 * torch.randn(width, generator=g)).to(DEVICE) if affine else None
    b = (0.1 * torch.randn(width, generator=g)).to(DEVICE) if affine else None
    out = modulated_layernorm(h, shift, scale, w, b, 1e-6)
    assert out.shape == (rows, width) and out.dtype == torch.float32
    assert rel_err(out, modulated_layernorm_ref(h, shift, scale, w, b)) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,width", [(3, 80), (17, 96)])
def test_low_precision_ln_params(dtype, rows, width):
    g = torch.Generator().manual_seed(7)
    h = torch.randn(rows, width, generator=g).to(DEVICE)
    shift, scale = torch.randn(2, rows, width, generator=g).to(DEVICE).unbind(0)
    w = (1 + 0.1 * torch.randn(width, generator=g)).to(DEVICE)
    b = (0.1 * torch.randn(width, generator=g)).to(DEVICE)
    out = modulated_layernorm(h, shift, scale, w.to(dtype), b.to(dtype), 1e-6)
    assert rel_err(out, modulated_layernorm_ref(h, shift, scale, w, b)) <= 2e-2


def test_rejects_bad_shapes():
    h = torch.randn(3, 8, device=DEVICE)
    with pytest.raises(ValueError):
        modulated_layernorm(h, h[:2], h, None, None, 1e-6)
    with pytest.raises(ValueError):
        modulated_layernorm(h, h, h, torch.ones(8, device=DEVICE), None, 1e-6)


def test_opcheck():
    """Schema, fake (meta) implementation and dynamic-shape tracing of the custom op."""
    h, shift, scale = torch.randn(3, 5, 16, device=DEVICE).unbind(0)
    torch.library.opcheck(modulated_layernorm, (h, shift, scale, torch.ones(16, device=DEVICE),
                                                torch.zeros(16, device=DEVICE), 1e-6))
