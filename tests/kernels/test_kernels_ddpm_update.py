"""ddpm_update kernel (CFG + x0 + clip + posterior mean + learned variance + noise) vs torch."""
import os

import pytest
import torch

from engine.ops.diffusion import make_tables
from engine.kernels.ddpm_update import ddpm_update, ddpm_update_ref, launch_ddpm

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)

TABLE = make_tables("50").as_tensor()


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def per_row(value, n):
    """The op takes one float32 value per result row."""
    return None if value is None else torch.full((n,), value, device=DEVICE)


@pytest.mark.parametrize("rows", [1, 3, 17, 64])
@pytest.mark.parametrize("channels", [16, 3, 1024])
@pytest.mark.parametrize("cfg", [None, 3.0])
@pytest.mark.parametrize("clip", [None, (-1.0, 1.0)])
def test_matches_reference(rows, channels, cfg, clip):
    g = torch.Generator().manual_seed(rows * channels)
    R = 2 * rows if cfg is not None else rows
    x = torch.randn(rows, channels, generator=g).to(DEVICE)
    out = torch.randn(R, 2 * channels, generator=g).to(DEVICE)
    noise = torch.randn(R, channels, generator=g).to(DEVICE)
    lo, hi = clip or (None, None)
    for i in (49, 0):   # index 0: no noise is added (nonzero = 0)
        coeffs = TABLE[i].to(DEVICE)
        new = ddpm_update(x, out, noise, coeffs, per_row(cfg, rows), per_row(0.9, rows), lo, hi)
        assert new.shape == x.shape
        assert rel_err(new, ddpm_update_ref(x, out, noise, coeffs, cfg, 0.9, lo, hi)) <= 1e-5


def test_engine_update_equivalence():
    """The reference helper is engine.ops.head.ddpm_update on the CFG-combined eps."""
    from engine.ops.head import ddpm_update as head_update

    n, C = 5, 16
    x, eps, v, noise = torch.randn(4, n, C).unbind(0)
    out = torch.cat([eps, v], dim=1).to(DEVICE)
    new = ddpm_update(x.to(DEVICE), out, noise.to(DEVICE), TABLE[7].to(DEVICE), None, per_row(1.2, n))
    assert rel_err(new, head_update(x, eps, v, TABLE[7], noise, 1.2).to(DEVICE)) <= 1e-6


@pytest.mark.parametrize("cfg", [None, "rows"])
def test_per_row_settings(cfg):
    """Rows with different CFG scales and temperatures in one launch: row r equals a launch
    with row r's numbers; equal values in a tensor give exactly the number's result."""
    n, C = 5, 16
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, C, generator=g).to(DEVICE)
    out = torch.randn(2 * n if cfg else n, 2 * C, generator=g).to(DEVICE)
    noise = torch.randn(2 * n, C, generator=g).to(DEVICE)
    coeffs = TABLE[20].to(DEVICE)
    scales = torch.tensor([1.0, 2.5, 4.0, 1.7, 7.5], device=DEVICE) if cfg else None
    temps = torch.tensor([0.9, 1.0, 0.5, 1.25, 0.05], device=DEVICE)
    new = ddpm_update(x, out, noise, coeffs, scales, temps, -1.0, 1.0)
    for r in range(n):
        one = launch_ddpm(x, out, noise, coeffs, None if cfg is None else float(scales[r]),
                          float(temps[r]), -1.0, 1.0)
        assert torch.equal(new[r], one[r]), r
    assert rel_err(new, ddpm_update_ref(x, out, noise, coeffs, scales, temps, -1.0, 1.0)) <= 1e-6
    same = ddpm_update(x, out, noise, coeffs, per_row(None if cfg is None else 2.7, n),
                       per_row(0.8, n), -1.0, 1.0)
    assert torch.equal(same, launch_ddpm(x, out, noise, coeffs, None if cfg is None else 2.7, 0.8,
                                         -1.0, 1.0))


def test_rejects_bad_arguments():
    x = torch.randn(3, 4, device=DEVICE)
    out = torch.randn(6, 8, device=DEVICE)
    coeffs, ones = TABLE[0].to(DEVICE), per_row(1.0, 3)
    with pytest.raises(ValueError):   # CFG needs 2n rows
        ddpm_update(x, out[:3], x, coeffs, per_row(2.0, 3), ones)
    with pytest.raises(ValueError):
        ddpm_update(x, out[:3], x, coeffs, None, ones, -1.0, None)
    with pytest.raises(ValueError, match=r"cfg_scale .*shape \[3\].*\[4\]"):
        ddpm_update(x, out, x, coeffs, per_row(2.0, 4), ones)
    with pytest.raises(ValueError, match=r"temperature .*shape \[3\].*\[3, 1\]"):
        ddpm_update(x, out[:3], x, coeffs, None, ones[:, None])


def test_opcheck():
    """Schema, fake (meta) implementation and dynamic-shape tracing of the custom op."""
    x = torch.randn(3, 16, device=DEVICE)
    out = torch.randn(6, 32, device=DEVICE)
    noise = torch.randn(6, 16, device=DEVICE)
    cfg, temp = torch.tensor([2.0, 1.5, 3.0], device=DEVICE), per_row(0.9, 3)
    torch.library.opcheck(ddpm_update, (x, out, noise, TABLE[5].to(DEVICE), cfg, temp, -1.0, 1.0))
    torch.library.opcheck(ddpm_update, (x, out[:3], noise, TABLE[5].to(DEVICE), None, temp))
