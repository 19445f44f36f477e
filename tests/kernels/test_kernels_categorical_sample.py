"""categorical_sample kernel (CFG + temperature + top-k + top-p + exponential-race draw in one
launch) vs its torch reference engine.ops.categorical.sample_logits: identical indices, identical
filtered logits (-inf where filtered), the same non-finite rows."""
import os

import pytest
import torch

from engine.ops.categorical import sample_logits
from engine.kernels.categorical_sample import categorical_sample, categorical_sample_ref, launch_categorical
from engine.kernels.utils import LAUNCHES

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)

pytestmark = pytest.mark.usefixtures("one_thread")


def case(bsz, tokens, vocab, seed, cfg=True, dtype=torch.float32, spread=3.0):
    """Logits [2B or B, T, V] in `dtype` and Exp(1) noise [B, T, V] on the device."""
    g = torch.Generator().manual_seed(seed)
    logits = (spread * torch.randn(2 * bsz if cfg else bsz, tokens, vocab, generator=g)).to(dtype)
    noise = torch.empty(bsz, tokens, vocab).exponential_(1, generator=g)
    return logits.to(DEVICE), noise.to(DEVICE)


def check(logits, noise, scale, temperature, top_k, top_p):
    idx, filtered, ok = categorical_sample(logits, noise, scale, temperature, top_k, top_p)
    want_idx, want_filtered, want_ok = categorical_sample_ref(logits, noise, scale, temperature, top_k, top_p)
    assert idx.dtype == torch.int64 and idx.shape == want_idx.shape
    assert torch.equal(idx, want_idx), f"{int((idx != want_idx).sum())} of {idx.numel()} indices differ"
    assert torch.equal(filtered, want_filtered)      # same values, -inf at the same tokens
    assert torch.equal(ok, want_ok)
    return idx, filtered


SETTINGS = [(None, None), (1, None), (7, None), (None, 0.5), (None, 1.0), (7, 0.9)]


@pytest.mark.parametrize("vocab,dtype", [(16, torch.float32), (257, torch.bfloat16), (1024, torch.float32),
                                         (4096, torch.bfloat16)])
@pytest.mark.parametrize("top_k,top_p", SETTINGS)
def test_matches_reference(vocab, dtype, top_k, top_p):
    """Three images x two sub-tokens, per-image cfg scales (1 and above) and temperatures."""
    logits, noise = case(3, 2, vocab, seed=vocab + 31 * (top_k or 0), dtype=dtype)
    scale = torch.tensor([1.0, 2.5, 4.0], device=DEVICE)
    temperature = torch.tensor([1.0, 0.7, 1.3], device=DEVICE)
    idx, filtered = check(logits, noise, scale, temperature, top_k, top_p)
    kept = torch.isfinite(filtered).sum(-1)
    if top_k is not None and top_p is None:
        assert (kept >= min(top_k, vocab)).all()          # more only where values tie with the k-th
    if top_p is not None and top_p < 1:
        assert (kept < vocab).all()
    assert torch.isfinite(filtered.gather(-1, idx[..., None])).all()         # drawn among the kept


def test_shared_settings_and_no_cfg():
    """0-d cfg scale and temperature tensors; no CFG (B rows); a number's result equals its
    tensor's (the reference divides by the Python number here)."""
    logits, noise = case(2, 3, 300, seed=5)
    check(logits, noise, torch.tensor(3.0, device=DEVICE), torch.tensor(0.8, device=DEVICE), 20, None)
    single, noise = case(2, 3, 300, seed=6, cfg=False)
    idx, filtered = check(single, noise, None, torch.tensor(1.7, device=DEVICE), None, 0.8)
    ref_idx, ref_filtered, _ = sample_logits(single, noise, None, 1.7, None, 0.8)
    assert torch.equal(idx, ref_idx) and torch.equal(filtered, ref_filtered)


def test_ties_at_the_thresholds():
    """Logits on a 0.5 grid (many ties, -0.0 and +0.0 among them): top-k keeps every value
    tied with the k-th; top-p keeps the tied tokens in index order (a stable sort's)."""
    g = torch.Generator().manual_seed(3)
    logits = ((2 * torch.randn(4, 2, 200, generator=g)).round() / 2).to(DEVICE)
    logits[0, 0, :50] = -0.0
    logits[0, 0, 50:100] = 0.0
    noise = torch.empty(4, 2, 200).exponential_(1, generator=g).to(DEVICE)
    one = torch.tensor(1.0, device=DEVICE)
    for top_k, top_p in ((3, None), (10, None), (None, 0.3), (None, 0.9), (10, 0.5)):
        _, filtered = check(logits, noise, None, one, top_k, top_p)
        if top_p is None:
            assert (torch.isfinite(filtered).sum(-1) > top_k).any()      # ties kept beyond k
    flat = torch.zeros(1, 1, 64, device=DEVICE)                          # every value tied
    noise = torch.empty(1, 1, 64).exponential_(1, generator=g).to(DEVICE)
    _, filtered = check(flat, noise, None, one, 1, None)
    assert torch.isfinite(filtered).all()
    _, filtered = check(flat, noise, None, one, None, 0.25)
    assert torch.isfinite(filtered[0, 0]).tolist() == [True] * 16 + [False] * 48   # index order


def test_largest_vocabulary():
    """ELM's largest sub-token vocabulary, 2 ** 16 (the kernel loops over it in blocks)."""
    logits, noise = case(1, 1, 2 ** 16, seed=9)
    check(logits, noise, torch.tensor(2.0, device=DEVICE), torch.tensor(0.9, device=DEVICE), 100, None)


def test_without_logits_output_and_one_launch():
    logits, noise = case(2, 2, 64, seed=1)
    scale, temperature = torch.tensor([2.0, 1.0], device=DEVICE), torch.tensor(1.0, device=DEVICE)
    before = LAUNCHES["categorical_sample"]
    idx, empty, ok = categorical_sample(logits, noise, scale, temperature, 5, None, write_logits=False)
    assert LAUNCHES["categorical_sample"] == before + 1 and empty.numel() == 0 and ok.all()
    assert torch.equal(idx, categorical_sample_ref(logits, noise, scale, temperature, 5, None)[0])


def test_non_finite_rows_are_flagged():
    """NaN logits or an infinite maximum: that row's ok is False (sample_logits' probabilities
    are not finite there), the other rows are sampled as usual."""
    logits, noise = case(3, 1, 32, seed=2, cfg=False)
    logits[1, 0, 4] = float("nan")
    logits[2, 0, 7] = float("inf")
    idx, _, ok = categorical_sample(logits, noise, None, torch.tensor(1.0, device=DEVICE), None, None)
    want_idx, _, want_ok = categorical_sample_ref(logits, noise, None, torch.tensor(1.0, device=DEVICE))
    assert ok.tolist() == want_ok.tolist() == [[True], [False], [False]]
    assert idx[0] == want_idx[0]


def test_rejects_bad_arguments():
    logits, noise = case(2, 2, 16, seed=0)
    one = torch.tensor(1.0, device=DEVICE)
    with pytest.raises(ValueError, match=r"expected logits \[2, 2, 16\]"):     # CFG needs 2B rows
        launch_categorical(logits, noise, None, one)
    with pytest.raises(ValueError, match="temperature must be a 0-d or \\[2\\]"):
        launch_categorical(logits, noise, one, torch.ones(3, device=DEVICE))
    with pytest.raises(ValueError, match="top_k must be at least 1"):
        launch_categorical(logits, noise, one, one, top_k=0)
    with pytest.raises(ValueError, match="top_p must be in"):
        launch_categorical(logits, noise, one, one, top_p=1.5)
    with pytest.raises(ValueError, match="noise must be float32"):
        launch_categorical(logits, noise.double(), one, one)


def test_opcheck():
    """Schema, fake (meta) implementation and tracing of the custom op."""
    logits, noise = case(2, 2, 16, seed=4)
    scale, temperature = torch.tensor([2.0, 3.0], device=DEVICE), torch.tensor(0.9, device=DEVICE)
    torch.library.opcheck(categorical_sample, (logits, noise, scale, temperature, 3, None, True))
    torch.library.opcheck(categorical_sample, (logits[:2], noise, None, temperature, None, None, False))
