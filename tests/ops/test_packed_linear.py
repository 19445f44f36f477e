"""engine.ops.packed_linear: the transformer's float32 products on MKL packed weights (native
extension) against F.linear, over row counts, input ranks, with and without bias; its custom op
under torch.compile; the packing each CPU gets (MKL on Intel, oneDNN elsewhere or without the
extension's MKL path; bf16 widened to oneDNN float32 where oneDNN has no bf16 kernels)."""
import pytest
import torch
import torch.nn.functional as F

from engine.ops import packed_linear
from engine.models.mar import Linear


@pytest.mark.parametrize("shape", [(1, 24), (8, 24), (37, 24), (700, 24), (2, 5, 24), (3, 0, 24)])
@pytest.mark.parametrize("bias", [True, False])
def test_mkl_packed_linear_matches_f_linear(native_ext, shape, bias):
    assert native_ext.has_mkl_packed()  # torch's CPU wheels link MKL
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(40, 24, generator=gen)
    b = torch.randn(40, generator=gen) if bias else None
    x = torch.randn(shape, generator=gen)
    kind, packed, rest = packed_linear.pack(weight, b, torch.float32, kind="mkl")
    assert kind == "mkl" and rest is None   # the bias lives in the pack
    got = packed_linear.run(kind, x, packed, None)
    assert got.shape == (*shape[:-1], 40)
    torch.testing.assert_close(got, F.linear(x, weight, b), rtol=1e-5, atol=1e-5)


def test_row_ranges_and_non_contiguous_input(native_ext):
    layer = Linear(16, 48)
    layer.pack(((0, 16), (16, None)), torch.float32)
    x = torch.randn(6, 32)[:, ::2]   # strided rows
    for start, stop in ((0, 16), (16, None)):
        want = F.linear(x, layer.weight[start:stop], layer.bias[start:stop])
        torch.testing.assert_close(layer.rows(x, start, stop), want, rtol=1e-5, atol=1e-5)
    # A range that was not packed, and autocast, use F.linear on the float32 weight.
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))


def test_custom_op_traces_fullgraph(native_ext, monkeypatch):
    monkeypatch.setattr(packed_linear, "intel_cpu", lambda: True)   # MKL's pack
    layer = Linear(24, 40)
    layer.pack(dtype=torch.float32)
    x = torch.randn(5, 24)
    compiled = torch.compile(lambda t: torch.relu(layer(t)) + 1, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), torch.relu(F.linear(x, layer.weight, layer.bias)) + 1,
                               rtol=1e-5, atol=1e-5)
    pack = layer.packs[(0, None)][1]
    torch.library.opcheck(packed_linear.mkl_packed_linear, (x, pack.id, 40))


def test_a_copied_layer_shares_its_pack(native_ext, monkeypatch):
    """MKL's packed buffer is only valid where it was written: copies share the one pack."""
    import copy

    monkeypatch.setattr(packed_linear, "intel_cpu", lambda: True)
    layer = Linear(24, 40)
    layer.pack(dtype=torch.float32)
    twin = copy.deepcopy(layer)
    assert twin.packs[(0, None)][1] is layer.packs[(0, None)][1]
    x = torch.randn(3, 24)
    del layer
    torch.testing.assert_close(twin(x), F.linear(x, twin.weight, twin.bias), rtol=1e-5, atol=1e-5)


def test_wrong_input_width_is_an_error(native_ext, monkeypatch):
    monkeypatch.setattr(packed_linear, "intel_cpu", lambda: True)
    layer = Linear(24, 40)
    layer.pack(dtype=torch.float32)
    with pytest.raises(RuntimeError, match=r"float32 input \[\.\.\., 24\]"):
        packed_linear.run("mkl", torch.randn(3, 25), layer.packs[(0, None)][1], None)


def test_without_the_mkl_path_float32_packs_for_onednn(monkeypatch):
    if not packed_linear.onednn_available():
        pytest.skip("this torch build has no oneDNN")  # environment guard; CI's torch has it
    monkeypatch.setattr(packed_linear, "mkl_available", lambda: False)
    layer = Linear(24, 40)
    layer.pack(dtype=torch.float32)
    assert layer.packs[(0, None)][0] == "onednn"
    x = torch.randn(7, 24)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)


def test_float32_packing_follows_the_cpu(native_ext, monkeypatch):
    """MKL's pack on Intel CPUs; oneDNN's reordered weights on other vendors' (MKL runs its
    slower AVX2 code there), with the same products."""
    if not packed_linear.onednn_available():
        pytest.skip("this torch build has no oneDNN")  # environment guard; CI's torch has it
    x = torch.randn(9, 24)
    for intel, kind in ((True, "mkl"), (False, "onednn")):
        monkeypatch.setattr(packed_linear, "intel_cpu", lambda: intel)
        layer = Linear(24, 40)
        layer.pack(dtype=torch.float32)
        assert layer.packs[(0, None)][0] == kind
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="float32"):
        packed_linear.pack(torch.randn(4, 3), None, torch.bfloat16, kind="mkl")


def test_bf16_without_onednn_bf16_kernels_widens(monkeypatch):
    """A CPU whose oneDNN has no bf16 kernels (AVX2 only) would refuse the bf16 reorder: there the
    bf16 product is oneDNN's float32 product of the bf16-rounded operands, rounded once to bf16 —
    against the same sums in float64, and against autocast's own bf16 F.linear."""
    if not packed_linear.onednn_available():
        pytest.skip("this torch build has no oneDNN")  # environment guard; CI's torch has it
    monkeypatch.setattr(packed_linear, "onednn_bf16_available", lambda: False)
    gen = torch.Generator().manual_seed(0)
    layer = Linear(96, 40)
    layer.pack(dtype=torch.bfloat16)
    assert layer.packs[(0, None)][0] == "widened" and layer.pack_dtype == torch.bfloat16
    x = torch.randn(37, 96, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer(x)
        autocast_product = F.linear(x, layer.weight, layer.bias)
    assert got.dtype == torch.bfloat16
    round_ = lambda t: t.to(torch.bfloat16).double()  # noqa: E731
    want = F.linear(round_(x), round_(layer.weight), round_(layer.bias)).to(torch.bfloat16)
    # float32 sums differ from float64's in the last float32 bits: a bf16 rounding can then
    # land one bf16 ulp away (2^-8 relative), and only rarely.
    ulp = 2.0 ** -7 * want.double().abs()
    assert ((got.double() - want.double()).abs() <= ulp).all()
    assert (got == want).float().mean() > 0.97
    assert ((got.double() - autocast_product.double()).abs() <= ulp).all()
    # A bf16 input is taken as it is; the bias-free and row-range forms widen too.
    layer.pack([(0, 8), (8, None)], dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        part = layer.rows(x.bfloat16(), 8, None)
    assert part.dtype == torch.bfloat16 and part.shape == (37, 32)
    assert ((part.double() - want[:, 8:].double()).abs() <= ulp[:, 8:]).all()
    with pytest.raises(RuntimeError, match="bfloat16"):
        packed_linear.pack(torch.randn(4, 3), None, torch.float32, kind="widened")


def test_bf16_without_onednn_keeps_f_linear(monkeypatch):
    """A torch build without oneDNN packs nothing for bf16: autocast's F.linear computes it."""
    monkeypatch.setattr(packed_linear, "onednn_bf16_available", lambda: False)
    monkeypatch.setattr(packed_linear, "onednn_available", lambda: False)
    layer = Linear(24, 40)
    layer.pack(dtype=torch.bfloat16)
    assert layer.packs == {} and layer.pack_dtype == torch.bfloat16
    x = torch.randn(6, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer(x)
        want = F.linear(x, layer.weight, layer.bias)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["mkl", "onednn", "bf16", "widened-bf16", "unpacked"])
@pytest.mark.parametrize("rows", [1, 8, 300])
def test_gelu_post_op_matches_gelu_of_the_product(native_ext, monkeypatch, kind, rows):
    """Linear.rows(gelu=True), as Mlp's fc1 runs it: exact (erf) GELU of the product, fused into
    oneDNN's product as a post-op, after MKL's, or after F.linear — each against the plain math.
    "bf16" is this CPU's bf16 pack (oneDNN's bf16 kernels, or widened where it has none),
    "widened-bf16" the widened one on any CPU."""
    if kind not in ("mkl", "unpacked") and not packed_linear.onednn_available():
        pytest.skip("this torch build has no oneDNN")  # environment guard; CI's torch has it
    monkeypatch.setattr(packed_linear, "intel_cpu", lambda: kind == "mkl")
    if kind == "widened-bf16":
        monkeypatch.setattr(packed_linear, "onednn_bf16_available", lambda: False)
    gen = torch.Generator().manual_seed(rows)
    layer = Linear(32, 96)
    x = torch.randn(rows, 32, generator=gen)
    bf16 = kind.endswith("bf16")
    if kind != "unpacked":
        layer.pack(dtype=torch.bfloat16 if bf16 else torch.float32)
        expected = kind.split("-")[0] if kind != "bf16" else (
            "onednn" if packed_linear.onednn_bf16_available() else "widened")
        assert layer.packs[(0, None)][0] == expected
    if bf16:
        # float32 sums of the bf16-rounded operands, GELU on them, then one bf16 rounding.
        round_ = lambda t: t.to(torch.bfloat16).double()  # noqa: E731
        want = F.gelu(F.linear(round_(x), round_(layer.weight), round_(layer.bias)))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = layer.rows(x, gelu=True)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.double(), want, rtol=8e-3, atol=1e-3)
    else:
        want = F.gelu(F.linear(x.double(), layer.weight.double(), layer.bias.double()))
        with torch.no_grad():
            got = layer.rows(x, gelu=True)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    # Not the tanh approximation: at these sizes the two differ by far more than the tolerance.
    assert (F.gelu(want, approximate="tanh") - want).abs().max() > 1e-4
    # Under autograd the fallback keeps h for the backward (no in-place GELU).
    if kind == "unpacked":
        got = layer.rows(x, gelu=True)
        got.sum().backward()
        assert layer.weight.grad is not None
