"""Fused ResBlock and final-layer+DDPM kernels vs torch references, including the split-hidden
path (partial sums + ticket counter) that wide heads use on GPUs."""
import os

import pytest
import torch

from engine.ops.diffusion import make_tables
from engine.kernels.head_block import (final_ddpm, final_ddpm_ref, launch_final, launch_resblock,
                                       resblock, resblock_ref)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)

TABLE = make_tables("50").as_tensor()


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def block(rows, width, h_rows=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = width
    t = dict(h=torch.randn(h_rows or rows, w, generator=g) * 2 + 0.5,
             mods=torch.randn(rows, 3 * w, generator=g),
             lnw=1 + 0.1 * torch.randn(w, generator=g), lnb=0.1 * torch.randn(w, generator=g),
             w1=torch.randn(w, w, generator=g) / w ** 0.5, b1=0.1 * torch.randn(w, generator=g),
             w2=torch.randn(w, w, generator=g) / w ** 0.5, b2=0.1 * torch.randn(w, generator=g))
    return {k: v.to(DEVICE) for k, v in t.items()}


def args(t, dtype=None):
    cast = (lambda m: m.to(dtype)) if dtype else (lambda m: m)
    return (t["h"], t["mods"], t["lnw"], t["lnb"], cast(t["w1"]), t["b1"], cast(t["w2"]), t["b2"])


@pytest.mark.parametrize("rows", [1, 3, 17, 64])
@pytest.mark.parametrize("width", [64, 80, 96])
def test_resblock_fp32(rows, width):
    t = block(rows, width, seed=rows + width)
    out = resblock(*args(t))
    assert out.shape == (rows, width)
    assert rel_err(out, resblock_ref(*args(t))) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,width", [(1, 64), (17, 80), (64, 96)])
def test_resblock_low_precision(dtype, rows, width):
    t = block(rows, width, seed=rows)
    out = resblock(*args(t, dtype))
    assert rel_err(out, resblock_ref(*args(t))) <= 2e-2
    assert rel_err(out, resblock_ref(*args(t, dtype))) <= (1e-5 if INTERPRET else 5e-3)


def test_resblock_wide():
    t = block(3, 1024, seed=5)
    assert rel_err(resblock(*args(t)), resblock_ref(*args(t))) <= 1e-5


@pytest.mark.parametrize("rows,h_rows", [(6, 3), (34, 17)])
def test_resblock_cfg_duplicated_input(rows, h_rows):
    """Under CFG the first block reads the n projected rows for both halves (row r % n)."""
    t = block(rows, 96, h_rows=h_rows, seed=rows)
    assert rel_err(resblock(*args(t)), resblock_ref(*args(t))) <= 1e-5


@pytest.mark.parametrize("rows,width,split,bn,bj", [(3, 96, 3, 64, 32), (17, 80, 2, 32, 64),
                                                    (40, 64, 4, 64, 16)])
def test_resblock_split_hidden(rows, width, split, bn, bj):
    """The GPU path for wide heads: hidden dim split over programs, partials summed by the
    last arriving program (in fixed order); counters must be re-armed for the next launch."""
    from engine.kernels.head_block import _COUNTERS

    t = block(rows, width, seed=split)
    cfg = dict(BM=16, BN=bn, BJ=bj, BK=64, SPLIT=split, num_warps=4)
    ref = resblock_ref(*args(t))
    first = launch_resblock(*args(t), config=cfg)
    assert rel_err(first, ref) <= 1e-5
    assert int(_COUNTERS[torch.device(DEVICE)].abs().sum()) == 0
    assert torch.equal(launch_resblock(*args(t), config=cfg), first)   # deterministic


def final_inputs(n, width, C, cfg, h_rows=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    R = 2 * n if cfg is not None else n
    t = dict(h=torch.randn(h_rows or R, width, generator=g) * 2,
             mods=torch.randn(R, 2 * width, generator=g),
             w=torch.randn(2 * C, width, generator=g) / width ** 0.5,
             b=0.1 * torch.randn(2 * C, generator=g),
             x=torch.randn(n, C, generator=g), noise=torch.randn(R, C, generator=g))
    return {k: v.to(DEVICE) for k, v in t.items()}


def per_row(value, n):
    """The op takes one float32 value per result row (numbers pass through)."""
    if value is None or isinstance(value, torch.Tensor):
        return value
    return torch.full((n,), value, device=DEVICE)


def final_args(t, i, cfg, clip, dtype=None, temperature=0.9):
    w = t["w"].to(dtype) if dtype else t["w"]
    lo, hi = clip or (None, None)
    n = t["x"].shape[0]
    return (t["h"], t["mods"], w, t["b"], t["x"], t["noise"], TABLE[i].to(DEVICE), per_row(cfg, n),
            per_row(temperature, n), lo, hi)


@pytest.mark.parametrize("n", [1, 3, 17, 64])
@pytest.mark.parametrize("width", [64, 80, 96])
@pytest.mark.parametrize("cfg,clip", [(None, None), (3.0, None), (2.0, (-1.0, 1.0))])
def test_final_fp32(n, width, cfg, clip):
    t = final_inputs(n, width, 16, cfg, seed=n + width)
    for i in (30, 0):
        out = final_ddpm(*final_args(t, i, cfg, clip))
        assert out.shape == (n, 16)
        assert rel_err(out, final_ddpm_ref(*final_args(t, i, cfg, clip))) <= 1e-5


def test_final_wide():
    t = final_inputs(3, 1024, 16, 2.0, seed=3)
    assert rel_err(final_ddpm(*final_args(t, 20, 2.0, (-1.0, 1.0))),
                   final_ddpm_ref(*final_args(t, 20, 2.0, (-1.0, 1.0)))) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_final_low_precision(dtype):
    t = final_inputs(5, 96, 16, 3.0, seed=1)
    out = final_ddpm(*final_args(t, 30, 3.0, None, dtype))
    assert rel_err(out, final_ddpm_ref(*final_args(t, 30, 3.0, None))) <= 2e-2


@pytest.mark.parametrize("n,C,h_rows,cfg", [(3, 16, 3, 2.0), (5, 3, None, None), (7, 16, None, 2.0)])
def test_final_shapes(n, C, h_rows, cfg):
    """Odd token dims, depth-0 heads (h has only the n rows under CFG), several row tiles."""
    t = final_inputs(n, 80, C, cfg, h_rows=h_rows, seed=C)
    ref = final_ddpm_ref(*final_args(t, 10, cfg, None))
    assert rel_err(final_ddpm(*final_args(t, 10, cfg, None)), ref) <= 1e-5
    small = launch_final(*final_args(t, 10, cfg, None), config=dict(BM=2, BC=16, BK=32, num_warps=4))
    assert rel_err(small, ref) <= 1e-5


@pytest.mark.parametrize("cfg", [None, "rows"])
def test_final_per_row_settings(cfg):
    """Different CFG scales and temperatures per row in one launch: row r equals a launch with
    row r's numbers; a tensor of equal values gives exactly the number's result."""
    n = 5
    t = final_inputs(n, 80, 16, cfg, h_rows=n if cfg else None, seed=7)
    scales = torch.tensor([1.0, 2.5, 4.0, 1.7, 7.5], device=DEVICE) if cfg else None
    temps = torch.tensor([0.9, 1.0, 0.5, 1.25, 0.05], device=DEVICE)
    clip = (-1.0, 1.0)
    new = final_ddpm(*final_args(t, 30, scales, clip, temperature=temps))
    for r in range(n):
        one = launch_final(*final_args(t, 30, None if cfg is None else float(scales[r]), clip,
                                       temperature=float(temps[r])))
        assert torch.equal(new[r], one[r]), r
    ref = final_ddpm_ref(*final_args(t, 30, scales, clip, temperature=temps))
    assert rel_err(new, ref) <= 1e-5
    number = None if cfg is None else 2.7
    assert torch.equal(final_ddpm(*final_args(t, 30, per_row(number, n), clip, temperature=per_row(0.8, n))),
                       launch_final(*final_args(t, 30, number, clip, temperature=0.8)))


def test_final_bad_row_settings():
    t = final_inputs(3, 32, 16, 2.0)
    with pytest.raises(ValueError, match=r"cfg_scale .*shape \[3\].*\[6\]"):
        final_ddpm(*final_args(t, 3, per_row(2.0, 6), None))
    with pytest.raises(ValueError, match=r"temperature .*shape \[3\].*\[2\]"):
        final_ddpm(*final_args(t, 3, 2.0, None, temperature=per_row(0.9, 2)))


def test_opcheck():
    """Schema, fake (meta) implementations and dynamic-shape tracing of both custom ops."""
    t = block(4, 32, h_rows=2)
    torch.library.opcheck(resblock, args(t))
    f = final_inputs(2, 32, 16, 2.0)
    torch.library.opcheck(final_ddpm, final_args(f, 3, torch.tensor([2.0, 3.5], device=DEVICE), None))
    f = final_inputs(2, 32, 16, None)
    torch.library.opcheck(final_ddpm, final_args(f, 3, None, (-1.0, 1.0)))
