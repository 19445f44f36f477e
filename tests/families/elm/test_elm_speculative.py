"""fast="speculative" (speculative Jacobi decoding) on ELM's AR family keeps the sampling
distribution: on tiny models whose exact joint distribution over every sequence is
enumerable (the published full-prefix pass, CFG, temperature, top-k / top-p re-stated here),
the empirical joint of many speculative samples passes a chi-square test (fixed seed). Also:
the acceptance rule against its re-statement, windows of every size, per-image generators,
and bad-input probes."""
import itertools

import numpy as np
import pytest
import torch
from scipy import stats

from engine.core.errors import SamplingError
from engine.families.elm import ELMConfig, ELMModel
from engine.models.elm import ELMTransformer
from engine.ops.speculative import verify

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(seed=0, code_dim=1, token_each=2, block_size=4, gain=1.0) -> ELMModel:
    torch.manual_seed(seed)
    config = ELMConfig(dim=16, n_layer=2, n_head=2, multiple_of=8, code_dim=code_dim, token_each=token_each,
                       num_classes=3, block_size=block_size)
    module = ELMTransformer(config)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.3)
        heads = module.output if token_each > 1 else [module.output]
        for head in heads:   # peaked, position-dependent distributions: a test that can fail
            head.weight.mul_(gain)
    return ELMModel(module, backend="reference")


def exact_joint(model, label, num_iter, cfg, temperature, top_k=None, top_p=None):
    """{sequence (tuple of per-position tuples of sub-tokens): probability}, re-stated: the
    published full-prefix forward for every prefix, guidance u + (c - u) * cfg, / temperature,
    top-k (ties kept), top-p (smallest most-likely set reaching top_p), softmax; sub-tokens of a
    position independent given the prefix."""
    c = model.config
    vocab, t_each = c.vocab_size, c.token_each
    positions = list(itertools.product(range(vocab), repeat=t_each))
    cond = torch.tensor([label, c.num_classes])

    def dist(prefix):
        idx = None if not prefix else torch.tensor([prefix, prefix])
        with torch.no_grad():
            logits = model.module.forward(idx, cond).view(2, -1, t_each, vocab)[:, -1].double()  # [2, T, V]
        z = (logits[1] + (logits[0] - logits[1]) * cfg) / temperature
        out = []
        for row in z:
            row = row.clone()
            if top_k is not None:
                kth = torch.sort(row, descending=True).values[top_k - 1]
                row[row < kth] = -np.inf
            if top_p is not None:
                order = torch.argsort(row, descending=True, stable=True)
                probs = torch.softmax(row[order], 0)
                before = torch.cumsum(probs, 0) - probs
                row[order[before >= top_p]] = -np.inf
            out.append(torch.softmax(row, 0).numpy())
        return out

    joint = {}

    def walk(prefix, prob):
        if len(prefix) == num_iter:
            joint[tuple(tuple(pos) for pos in prefix)] = prob
            return
        d = dist(prefix)
        for pos in positions:
            pr = prob * np.prod([d[t][pos[t]] for t in range(t_each)])
            if pr > 0:
                walk(prefix + [list(pos)], pr)
    walk([], 1.0)
    return joint


def chi_square(model, label, n, num_iter, cfg, temperature, window, top_k=None, top_p=None, seed=0):
    joint = exact_joint(model, label, num_iter, cfg, temperature, top_k, top_p)
    g = torch.Generator().manual_seed(seed)
    tokens = model.sample_tokens(n, labels=[label] * n, num_iter=num_iter, cfg=cfg, temperature=temperature,
                                 top_k=top_k, top_p=top_p, generator=g, fast={"speculative": {"window": window}})
    assert tokens.shape == (n, num_iter, model.config.token_each)
    counts: dict = {}
    for row in tokens.tolist():
        key = tuple(tuple(p) for p in row)
        assert key in joint, f"sampled a sequence of probability 0: {key}"
        counts[key] = counts.get(key, 0) + 1
    keys = sorted(joint, key=joint.get, reverse=True)
    expected = np.array([joint[k] * n for k in keys])
    observed = np.array([counts.get(k, 0) for k in keys])
    # Cells expected below 5 pooled into one (the chi-square approximation's rule of thumb).
    small = expected < 5
    expected = np.append(expected[~small], expected[small].sum())
    observed = np.append(observed[~small], observed[small].sum())
    if expected[-1] == 0:
        expected, observed = expected[:-1], observed[:-1]
    return stats.chisquare(observed, expected * observed.sum() / expected.sum()).pvalue


@pytest.mark.parametrize("window", [1, 2, 16])
def test_speculative_keeps_the_joint_distribution_with_cfg(window):
    model = tiny_model(seed=1)
    p = chi_square(model, label=2, n=6000, num_iter=3, cfg=2.0, temperature=0.8, window=window)
    assert p > 1e-3, f"window {window}: chi-square p = {p:.2e}"


def test_speculative_keeps_the_joint_distribution_with_top_k_and_top_p():
    model = tiny_model(seed=2, code_dim=2, token_each=1)
    p = chi_square(model, label=0, n=6000, num_iter=3, cfg=1.5, temperature=1.3, window=3, top_k=3, top_p=0.9)
    assert p > 1e-3, f"chi-square p = {p:.2e}"


def test_speculative_without_cfg_and_the_test_detects_a_wrong_distribution():
    model = tiny_model(seed=3)
    assert chi_square(model, label=1, n=6000, num_iter=3, cfg=1.0, temperature=1.0, window=4) > 1e-3
    # The same samples tested against another temperature's joint fail: the test has power.
    joint = exact_joint(model, 1, 3, 1.0, 0.5)
    g = torch.Generator().manual_seed(0)
    tokens = model.sample_tokens(6000, labels=[1] * 6000, num_iter=3, cfg=1.0, temperature=1.0, generator=g,
                                 fast="speculative")
    keys = sorted(joint, key=joint.get, reverse=True)[:20]
    observed = np.array([sum(1 for r in tokens.tolist() if tuple(tuple(p) for p in r) == k) for k in keys])
    expected = np.array([joint[k] for k in keys]) * 6000
    assert stats.chisquare(observed, expected * observed.sum() / expected.sum()).pvalue < 1e-6


def test_verify_against_a_restatement_of_speculative_sampling():
    """One position, any q: accepted with min(1, p/q), else the residual: the output is p.
    Re-stated per sample in plain Python and compared draw for draw."""
    torch.manual_seed(0)
    n, vocab = 4000, 5
    p = torch.softmax(torch.randn(vocab) * 2, 0)
    q = torch.softmax(torch.randn(vocab) * 2, 0)
    draft = torch.multinomial(q, n, replacement=True)
    u, race = torch.rand(n), torch.empty(n, vocab).exponential_()
    tokens, first = verify(p.expand(n, 1, 1, vocab), q.expand(n, 1, 1, vocab), draft.view(n, 1, 1),
                           torch.zeros(n, 1, dtype=torch.bool), u.view(n, 1, 1), race.view(n, 1, 1, vocab))
    residual = (p - q).clamp_min(0)
    residual = residual / residual.sum()
    for i in range(n):
        accept = u[i] < p[draft[i]] / q[draft[i]]
        want = int(draft[i]) if accept else int(torch.argmax(residual / race[i]))
        assert int(tokens[i, 0, 0]) == want
        assert int(first[i]) == (1 if accept else 0)
    counts = torch.bincount(tokens.flatten(), minlength=vocab).numpy()
    assert stats.chisquare(counts, p.numpy() * n).pvalue > 1e-3


def test_verify_first_rejection_and_fixed_positions():
    vocab = 3
    p = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]).view(1, 3, 1, vocab)
    q = p.clone()
    draft = torch.tensor([[[0], [2], [2]]])      # position 1's draft has p = 0: rejected
    u = torch.zeros(1, 3, 1)
    race = torch.ones(1, 3, 1, vocab)
    q[0, 1, 0] = torch.tensor([0, 0, 1.0])
    tokens, first = verify(p, q, draft, torch.zeros(1, 3, dtype=torch.bool), u, race)
    assert first.tolist() == [1] and tokens[0, 1, 0] == 1      # redrawn from max(0, p - q) = [0, 1, 0]
    tokens, first = verify(p, q, draft, torch.tensor([[True, True, False]]), u, race)
    assert first.tolist() == [3] and tokens[0, 1, 0] == 2      # a fixed position is kept as it is


def test_per_image_generators_make_images_independent_of_their_batch():
    model = tiny_model(seed=4, block_size=16)
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    alone = model.sample_tokens(1, labels=[1], cfg=2.0, temperature=0.9, generator=gens([7]), fast="speculative")
    batch = model.sample_tokens(3, labels=[0, 1, 2], cfg=2.0, temperature=0.9, generator=gens([3, 7, 9]),
                                fast="speculative")
    assert torch.equal(batch[1:2], alone)
    assert model.last_passes <= 16


def test_speculative_is_the_fast_mode_of_elm_ar_and_others_are_refused():
    model = tiny_model()
    with pytest.raises(SamplingError, match="fast: elm-ar models cannot use 'disa'.*exact, speculative"):
        model.sample_tokens(1, labels=[0], fast="disa")
    with pytest.raises(SamplingError, match="fast: speculative window must be an integer"):
        model.sample_tokens(1, labels=[0], fast={"speculative": {"window": 0}})
    with pytest.raises(SamplingError, match="fast: speculative has no parameter 'size'"):
        model.sample_tokens(1, labels=[0], fast={"speculative": {"size": 3}})
    assert model.resolve_settings(fast="speculative")["fast"] == "speculative"
    exact = model.sample_tokens(2, labels=[0, 1], generator=torch.Generator().manual_seed(0), fast="exact")
    default = model.sample_tokens(2, labels=[0, 1], generator=torch.Generator().manual_seed(0))
    assert torch.equal(exact, default)


def test_the_chi_square_test_catches_a_wrong_acceptance_rule(monkeypatch):
    """Accepting every draft (no min(1, p/q) test) changes the distribution: the test sees it."""
    import engine.families.speculative as speculative

    def accept_all(p, q, draft, fixed, u, race):
        return verify(p, q, draft, fixed, torch.zeros_like(u), race)
    monkeypatch.setattr(speculative, "verify", accept_all)
    model = tiny_model(seed=1)
    assert chi_square(model, label=2, n=6000, num_iter=3, cfg=2.0, temperature=0.8, window=16) < 1e-6
