"""engine.packed_linear: the transformer's float32 products on MKL packed weights (native
extension) against F.linear, over row counts, input ranks, with and without bias; its custom op
under torch.compile; the packing each CPU gets (MKL on Intel, oneDNN elsewhere or without the
extension's MKL path; bf16 unpacked where oneDNN has no bf16 kernels)."""
import pytest
import torch
import torch.nn.functional as F

from engine import packed_linear
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


def test_bf16_without_onednn_bf16_kernels_keeps_f_linear(monkeypatch):
    """A CPU whose oneDNN has no bf16 kernels (AVX2 only) would refuse the bf16 reorder: the
    layer stays unpacked and autocast's F.linear computes the product."""
    monkeypatch.setattr(packed_linear, "onednn_bf16_available", lambda: False)
    layer = Linear(24, 40)
    layer.pack(dtype=torch.bfloat16)
    assert layer.packs == {} and layer.pack_dtype == torch.bfloat16
    x = torch.randn(6, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer(x)
        want = F.linear(x, layer.weight, layer.bias)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["mkl", "onednn", "onednn-bf16", "unpacked"])
@pytest.mark.parametrize("rows", [1, 8, 300])
def test_gelu_post_op_matches_gelu_of_the_product(native_ext, monkeypatch, kind, rows):
    """Linear.rows(gelu=True), as Mlp's fc1 runs it: exact (erf) GELU of the product, fused into
    oneDNN's product as a post-op, after MKL's, or after F.linear — each against the plain math."""
    if kind.startswith("onednn") and not packed_linear.onednn_available():
        pytest.skip("this torch build has no oneDNN")  # environment guard; CI's torch has it
    if kind == "onednn-bf16" and not packed_linear.onednn_bf16_available():
        pytest.skip("this CPU's oneDNN has no bf16 kernels")  # environment guard (AVX2-only CPUs)
    monkeypatch.setattr(packed_linear, "intel_cpu", lambda: kind == "mkl")
    gen = torch.Generator().manual_seed(rows)
    layer = Linear(32, 96)
    x = torch.randn(rows, 32, generator=gen)
    bf16 = kind == "onednn-bf16"
    if kind != "unpacked":
        layer.pack(dtype=torch.bfloat16 if bf16 else torch.float32)
        assert layer.packs[(0, None)][0] == kind.split("-")[0]
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
