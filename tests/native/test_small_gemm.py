"""The native backend's small-row GEMM (csrc/small_gemm.cpp): A [M, K] @ W [N, K]^T for 1-16 rows
against torch's product, over shapes (N and K not multiples of 16 included), dtypes and threads.
Every build has the kernel (AVX-512, AVX2 + FMA, or portable C++: the one this CPU compiled)."""
import pytest
import torch

SHAPES = [(1, 16, 1024), (2, 1024, 1024), (8, 1024, 1024), (13, 1024, 32), (16, 100, 37),
          (5, 768, 1040), (3, 7, 5), (16, 1024, 16), (9, 33, 1)]


@pytest.fixture(scope="module")
def ext(native_ext):
    isa = native_ext.small_gemm_isa()
    assert isa in ("avx512", "avx2", "portable")
    assert native_ext.has_small_gemm() == (isa != "portable")   # what the head loop's plan uses
    return native_ext


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_float32_matches_torch(ext, m, k, n, threads):
    gen = torch.Generator().manual_seed(m * 1000 + k + n)
    a, w = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = ext.small_gemm(a, ext.small_gemm_pack(w), n)
    finally:
        torch.set_num_threads(before)
    want = a.double() @ w.double().t()
    assert got.dtype == torch.float32 and got.shape == (m, n)
    # float32 accumulation over k terms of unit variance: error ~ sqrt(k) * eps * |terms|
    assert (got.double() - want).abs().max() <= 1e-5 * k


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", range(1, 17))
def test_every_row_count(ext, m, weight_dtype):
    """Each row count has its own register blocking (AVX2 splits 7-16 rows into groups and k into
    blocks): K = 40 ends mid-block, N = 40 mid-panel."""
    gen = torch.Generator().manual_seed(m)
    a, w = torch.randn(m, 40, generator=gen), torch.randn(40, 40, generator=gen).to(weight_dtype)
    got = ext.small_gemm(a, ext.small_gemm_pack(w), 40)
    want = a.double() @ w.double().t()
    assert (got.double() - want).abs().max() <= 1e-5 * 40


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_bfloat16_rows_and_weights(ext, m, k, n):
    gen = torch.Generator().manual_seed(m + k * 7 + n)
    a = torch.randn(m, k, generator=gen).bfloat16()
    w = torch.randn(n, k, generator=gen).bfloat16()
    got = ext.small_gemm(a, ext.small_gemm_pack(w), n)
    want = (a.double() @ w.double().t())   # exact products of the bf16 values, then one rounding
    assert got.dtype == torch.bfloat16
    ulp = want.abs().clamp_min(1e-3) * 2.0 ** -8
    assert ((got.double() - want).abs() <= ulp + 1e-5 * k).all()


def test_float32_weights_with_bfloat16_rows(ext):
    gen = torch.Generator().manual_seed(3)
    a, w = torch.randn(4, 64, generator=gen).bfloat16(), torch.randn(48, 64, generator=gen)
    got = ext.small_gemm(a, ext.small_gemm_pack(w), 48)
    want = (a.double() @ w.double().t())
    assert got.dtype == torch.bfloat16
    assert ((got.double() - want).abs() <= want.abs() * 2.0 ** -8 + 1e-4).all()


@pytest.mark.parametrize("m,k,n", [(4, 64, 48), (13, 1023, 40), (16, 7, 33), (1, 1, 16)])
def test_float32_rows_with_bfloat16_weights(ext, m, k, n):
    gen = torch.Generator().manual_seed(m + k + n)
    a = torch.randn(m, k, generator=gen)
    w = torch.randn(n, k, generator=gen).bfloat16()
    got = ext.small_gemm(a, ext.small_gemm_pack(w), n)
    want = a.double() @ w.double().t()   # the float32 rows are not rounded to bfloat16
    assert got.dtype == torch.float32
    assert (got.double() - want).abs().max() <= 1e-5 * k


def test_bfloat16_weights_pack_in_k_pairs_on_bf16_dot_builds(ext):
    w = torch.randn(20, 5).bfloat16()   # 2 panels of 16 columns, K = 5 -> 3 pairs
    panels = ext.small_gemm_pack(w)
    if ext.small_gemm_bf16_dot():
        assert panels.shape == (2, 3, 16, 2)
        assert torch.equal(panels[1, 1, 3], w[19, 2:4])     # column 19, k = 2, 3
        assert panels[1, 2, 3, 1] == 0 and panels[1, 1, 4:].abs().sum() == 0   # pads
    else:
        assert panels.shape == (2, 5, 16)
    assert ext.small_gemm_pack(w.float()).shape == (2, 5, 16)


def test_strided_rows(ext):
    base = torch.randn(6, 80)
    a = base[::2, 8:72]          # rows 160 floats apart, 64 wide
    w = torch.randn(20, 64)
    got = ext.small_gemm(a, ext.small_gemm_pack(w), 20)
    torch.testing.assert_close(got, a @ w.t(), rtol=1e-5, atol=1e-5)


def test_rejects_what_it_cannot_do(ext):
    w = torch.randn(32, 64)
    panels = ext.small_gemm_pack(w)
    with pytest.raises(RuntimeError, match="1 to 16 rows"):
        ext.small_gemm(torch.randn(17, 64), panels, 32)
    with pytest.raises(RuntimeError, match="do not fit"):
        ext.small_gemm(torch.randn(2, 63), panels, 32)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        ext.small_gemm(torch.randn(2, 64).double(), panels, 32)
