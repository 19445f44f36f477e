"""linear_epilogue kernel (GEMM + fused prologue/epilogue) vs its torch reference."""
import os

import pytest
import torch

from engine.kernels.linear_epilogue import (EPI_BIAS, EPI_GATE_RES, EPI_SILU, PRO_NONE, PRO_SILU,
                                            linear_epilogue, linear_epilogue_ref)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)

# (prologue, epilogue, row add): plain bias, bias+SiLU, the adaLN GEMM, gate/residual.
VARIANTS = {"bias": (PRO_NONE, EPI_BIAS, False), "silu": (PRO_NONE, EPI_SILU, False),
            "adaln": (PRO_SILU, EPI_BIAS, True), "gate_res": (PRO_NONE, EPI_GATE_RES, False)}


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def make(rows, k, n, seed):
    g = torch.Generator().manual_seed(seed)
    t = dict(x=torch.randn(rows, k, generator=g), weight=torch.randn(n, k, generator=g) / k ** 0.5,
             bias=0.1 * torch.randn(n, generator=g), row=torch.randn(k, generator=g),
             res=torch.randn(rows, n, generator=g), mods=torch.randn(rows, 3 * n, generator=g))
    return {name: v.to(DEVICE) for name, v in t.items()}


def run(fn, t, variant, weight):
    pro, epi, has_row = VARIANTS[variant]
    gate_res = epi == EPI_GATE_RES
    return fn(t["x"], weight, t["bias"], t["row"] if has_row else None, pro, epi,
              t["res"] if gate_res else None, t["mods"][:, 2 * weight.shape[0]:] if gate_res else None)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("rows", [1, 3, 17, 64])
@pytest.mark.parametrize("width", [64, 80, 96, 1024])
def test_fp32(variant, rows, width):
    t = make(rows, width, width, rows + width)
    out = run(linear_epilogue, t, variant, t["weight"])
    assert out.shape == (rows, width) and out.dtype == torch.float32
    assert rel_err(out, run(linear_epilogue_ref, t, variant, t["weight"])) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("rows,width", [(1, 64), (17, 80), (64, 96)])
def test_low_precision_weights(dtype, variant, rows, width):
    t = make(rows, width, width, rows * width)
    w = t["weight"].to(dtype)
    out = run(linear_epilogue, t, variant, w)
    # The documented accuracy: against the fp32 model...
    assert rel_err(out, run(linear_epilogue_ref, t, variant, t["weight"])) <= 2e-2
    # ...and the kernel math itself is fp32 on the rounded weights (GPU: TF32 activations).
    assert rel_err(out, run(linear_epilogue_ref, t, variant, w)) <= (1e-5 if INTERPRET else 5e-3)


@pytest.mark.parametrize("rows,k,n", [(6, 64, 8 * 96), (5, 96, 16), (2, 16, 96)])
def test_head_shapes(rows, k, n):
    """Shapes the backend uses: adaLN (N = (3*depth+2)*w), input_proj (K = C), cond_embed."""
    t = make(rows, k, n, 3)
    for variant in ("bias", "adaln"):
        out = run(linear_epilogue, t, variant, t["weight"])
        assert rel_err(out, run(linear_epilogue_ref, t, variant, t["weight"])) <= 1e-5


def test_rejects_bad_shapes():
    x = torch.randn(3, 8, device=DEVICE)
    with pytest.raises(ValueError):
        linear_epilogue(x, torch.randn(4, 9, device=DEVICE), torch.zeros(4, device=DEVICE))
    with pytest.raises(ValueError):
        linear_epilogue(x, torch.randn(4, 8, device=DEVICE), torch.zeros(4, device=DEVICE),
                        None, PRO_NONE, EPI_GATE_RES, None, None)


def test_opcheck():
    """Schema, fake (meta) implementation and dynamic-shape tracing of the custom op."""
    t = make(5, 16, 32, 0)
    torch.library.opcheck(linear_epilogue, (t["x"], t["weight"], t["bias"], t["row"], PRO_SILU, EPI_BIAS))
    torch.library.opcheck(linear_epilogue, (t["x"], t["weight"], t["bias"], None, PRO_NONE, EPI_GATE_RES,
                                            t["res"], t["mods"][:, :32]))
