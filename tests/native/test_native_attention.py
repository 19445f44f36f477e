"""The native CPU attention kernel (csrc/attention.cpp, engine.ops.attention.cpu_attention) against a
float64 restatement of softmax(q k^T / sqrt(D)) v over shapes (head widths and key counts not
multiples of 16, one key, tail query blocks), dtypes, strided inputs and threads; its errors; the
custom op under torch.compile; and which layers route to it (the native backend's transformer,
never the reference backend's, SDPA for few queries or under autograd)."""
import pytest
import torch
import torch.nn.functional as F

import engine
from engine.ops import attention as attention_mod
from engine.core.counting import count_ops
from helpers import CHECKPOINT

OP = "engine.cpu_attention.default"


def reference(q, k, v):
    s = q.double() @ k.double().transpose(-1, -2) * q.shape[-1] ** -0.5
    return s.softmax(-1) @ v.double()


def qkv(b, h, lq, lk, d, dtype, seed):
    """q, k, v as the transformer makes them: strided views of one [B, L, 3, H, D] product."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(b, max(lq, lk), 3, h, d, generator=gen) * 2).to(dtype)
    q, k, v = x.permute(2, 0, 3, 1, 4)
    return q[:, :, :lq], k[:, :, :lk], v[:, :, :lk]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("b,h,lq,lk,d", [(1, 1, 1, 1, 16), (2, 3, 9, 17, 24), (1, 2, 33, 320, 64),
                                         (2, 12, 64, 100, 64), (1, 2, 16, 40, 80)])
def test_float32_matches_the_math(native_ext, b, h, lq, lk, d, threads):
    q, k, v = qkv(b, h, lq, lk, d, torch.float32, seed=lq * 1000 + lk + d)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = native_ext.attention(q, k, v, d ** -0.5)
    finally:
        torch.set_num_threads(before)
    assert got.shape == (b, h, lq, d) and got.dtype == torch.float32 and got.is_contiguous()
    want = reference(q, k, v)
    err = ((got.double() - want).abs().max() / want.abs().max()).item()
    sdpa = F.scaled_dot_product_attention(q, k, v)
    sdpa_err = ((sdpa.double() - want).abs().max() / want.abs().max()).item()
    assert err < 5e-6 and err < 8 * sdpa_err + 1e-7, (err, sdpa_err)   # float32 rounding, as SDPA's


@pytest.mark.parametrize("spread", [0.0, 10.0, 40.0])
def test_float32_flat_and_peaked_scores(native_ext, spread):
    """Equal scores (every key weighs 1 / Lk) and scores tens to hundreds apart (most exps below
    float32's range: they must be 0, not NaN or garbage, and the max row still sums to 1)."""
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(1, 2, 24, 64, generator=gen) * spread
    k = torch.randn(1, 2, 77, 64, generator=gen)
    v = torch.randn(1, 2, 77, 64, generator=gen)
    got = native_ext.attention(q, k, v, 64 ** -0.5)
    want = reference(q, k, v)
    assert torch.isfinite(got).all()
    err = ((got.double() - want).abs().max() / want.abs().max()).item()
    sdpa = F.scaled_dot_product_attention(q, k, v)
    sdpa_err = ((sdpa.double() - want).abs().max() / want.abs().max()).item()
    # scores ~100 apart carry float32 rounding of ~1e-5 into their exps: SDPA's error too
    assert err < 2 * sdpa_err + 1e-6 and err < 2e-5, (err, sdpa_err)


@pytest.mark.parametrize("lq,lk,d", [(8, 320, 64), (21, 50, 32), (9, 33, 24), (16, 7, 5)])
def test_bf16_inputs(native_ext, lq, lk, d):
    q, k, v = qkv(2, 2, lq, lk, d, torch.bfloat16, seed=lk)
    got = native_ext.attention(q, k, v, d ** -0.5)
    assert got.dtype == torch.bfloat16
    want = reference(q, k, v)   # of the same bf16 values
    bound = want.abs() * 2 ** -8 + 1e-6   # the output's rounding (float32 arithmetic)
    if native_ext.attention_bf16_dot():
        # vdpbf16ps: exact q k products; the probabilities p rounded to bf16 (|dp| <= 2^-9 p)
        # before P V, so each output moves by at most 2^-9 * sum_j p_j |v_j| / sum_j p_j.
        p = (q.double() @ k.double().transpose(-1, -2) * d ** -0.5).softmax(-1)
        bound = bound + 2 ** -9 * 1.01 * (p @ v.double().abs())
    assert ((got.double() - want).abs() <= bound).all()


def test_errors_name_the_problem(native_ext):
    q, k, v = qkv(1, 2, 4, 5, 16, torch.float32, seed=0)
    with pytest.raises(RuntimeError, match=r"\[B, H, L, D\]"):
        native_ext.attention(q[0], k[0], v[0], 0.25)
    with pytest.raises(RuntimeError, match="one dtype"):
        native_ext.attention(q, k.double(), v, 0.25)
    with pytest.raises(RuntimeError, match="unit stride"):
        wide = torch.randn(1, 2, 4, 32)
        native_ext.attention(wide[..., ::2], k, v, 0.25)
    with pytest.raises(RuntimeError, match="matching q"):
        native_ext.attention(q, k[:, :1], v, 0.25)
    with pytest.raises(RuntimeError, match="at least one key"):
        native_ext.attention(q, k[:, :, :0], v[:, :, :0], 0.25)


def test_custom_op_traces_fullgraph(native_ext):
    q, k, v = qkv(1, 2, 20, 30, 16, torch.float32, seed=1)
    torch.library.opcheck(attention_mod.cpu_attention, (q.contiguous(), k.contiguous(), v.contiguous(), 0.25))
    fn = torch.compile(lambda q, k, v: attention_mod.attention(q, k, v, native=True), fullgraph=True)
    torch.testing.assert_close(fn(q, k, v), F.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-6)


def test_few_queries_and_autograd_keep_sdpa(native_ext):
    q, k, v = qkv(1, 2, attention_mod.NATIVE_MIN_QUERIES, 30, 16, torch.float32, seed=2)
    assert attention_mod.native_usable(q, k, v)
    assert not attention_mod.native_usable(q[:, :, :attention_mod.NATIVE_MIN_QUERIES - 1], k, v)
    assert not attention_mod.native_usable(q.double(), k.double(), v.double())
    assert not attention_mod.native_usable(q.detach().requires_grad_(), k, v)
    _, counter = count_ops(attention_mod.attention, q, k, v, native=True)
    assert counter.counts[OP] == 1
    _, counter = count_ops(attention_mod.attention, q, k, v)          # native=False: SDPA
    assert counter.counts[OP] == 0


def test_the_native_backend_routes_its_transformer_here(native_ext):
    """Every attention layer of a native-backend model takes the kernel (those with enough query
    rows call it); the reference backend's never; the step's output matches SDPA's."""
    from engine.models.mar import AttentionBase

    model = engine.load(CHECKPOINT, backend="native")
    layers = [m for m in model.mar.modules() if isinstance(m, AttentionBase)]
    assert layers and all(m.use_native_kernel for m in layers)
    c = model.config
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randn(2, c.seq_len, c.token_dim, generator=gen)
    order = torch.argsort(torch.rand(2, c.seq_len, generator=gen), dim=1)
    known, predict = order[:, :5].sort(dim=1).values, order[:, 5:].sort(dim=1).values
    class_emb = model.mar.class_embedding(torch.tensor([1, 2]), 2, False)
    got, counter = count_ops(model.mar.forward_step, tokens, known, predict, (class_emb,))
    assert counter.counts[OP] >= 1
    for m in layers:
        m.use_native_kernel = False
    want, plain = count_ops(model.mar.forward_step, tokens, known, predict, (class_emb,))
    assert plain.counts[OP] == 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    other = engine.load(CHECKPOINT, backend="reference")
    assert not any(m.use_native_kernel for m in other.mar.modules() if isinstance(m, AttentionBase))
