"""The built-in masked model `digits-elm-mlm` (engine/builtin/train_mlm.py): its MaskGIT objective against
a plain re-statement, a few training steps, and the shipped model (loading, shapes, accuracy)."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import engine
from engine.families.elm_mlm import ELMMLMConfig
from engine.loading import BUILTIN_MODELS
from engine.models.elm_mlm import ELMMLMTransformer
from engine.builtin.training import TrainConfig, train
from engine.builtin.train_mlm import DIGITS_ELM_MLM, ELMMLMTask, masked_counts, mlm_loss, position_mask

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(dim=32, n_layer=1, n_head=2, multiple_of=16, token_each=2, code_dim=3, num_classes=3,
            class_dropout_prob=0.1, block_size=4)


def tiny_task(n=48, seed=0):
    """A tiny config and codes that are a function of the label (so there is something to learn)."""
    config = ELMMLMConfig.from_dict(TINY)
    labels = torch.arange(n) % config.num_classes
    base = torch.randint(0, config.vocab_size, (config.num_classes, config.block_size, config.token_each),
                         generator=torch.Generator().manual_seed(seed))
    return config, base[labels], labels


def test_masking_matches_the_cos_schedule():
    bsz, seq = 4096, 16
    masked = position_mask(bsz, seq, torch.Generator().manual_seed(3))
    # Re-statement: the same draws, u then the keys; mask the n lowest keys of each row.
    g = torch.Generator().manual_seed(3)
    u = torch.rand(bsz, generator=g, dtype=torch.float64)
    want_counts = [max(1, math.ceil(seq * math.cos(math.pi / 2 * x))) for x in u.tolist()]
    keys = torch.rand(bsz, seq, generator=g)
    want = torch.zeros(bsz, seq, dtype=torch.bool)
    for i, n in enumerate(want_counts):
        want[i, torch.sort(keys[i]).indices[:n]] = True
    assert torch.equal(masked, want)
    assert masked.sum(1).tolist() == want_counts
    assert torch.equal(masked_counts(bsz, seq, torch.Generator().manual_seed(3)), torch.tensor(want_counts))
    # Every count 1..16 occurs, and the mean ratio is E[ceil(16 cos(pi u / 2))] / 16 (about 2 / pi).
    assert set(want_counts) == set(range(1, seq + 1))
    expected = np.mean([math.ceil(seq * math.cos(math.pi / 2 * x)) for x in np.linspace(0, 1, 100001)[:-1]]) / seq
    assert abs(masked.float().mean().item() - expected) < 0.02      # ~4 standard errors


def test_loss_is_cross_entropy_on_masked_sub_tokens_only():
    config, codes, labels = tiny_task(6)
    torch.manual_seed(0)
    module = ELMMLMTransformer(config).eval()
    masked = position_mask(len(codes), config.block_size, torch.Generator().manual_seed(1))
    loss, stats = mlm_loss(module, codes, labels, masked)
    # Re-statement: mask id at every sub-token of a masked position, CE averaged over those.
    inputs = codes.clone()
    inputs[masked] = config.mask_id
    logp = F.log_softmax(module(inputs, labels), dim=-1).view(*codes.shape, config.vocab_size)
    terms = -logp.gather(-1, codes.unsqueeze(-1)).squeeze(-1)[masked]          # [M, T]
    torch.testing.assert_close(loss, terms.mean())
    assert 0 <= stats["accuracy"] <= 1

    class Spy(torch.nn.Module):
        """The module with arbitrary logits at the known positions: the loss must not change."""
        mask_id = config.mask_id

        def forward(self, idx, rows):
            out = module(idx, rows)
            known = (idx != config.mask_id).reshape(idx.shape[0], -1, 1)
            return out + known * torch.randn_like(out) * 100

    torch.testing.assert_close(mlm_loss(Spy(), codes, labels, masked)[0], loss)


def test_a_few_training_steps_reduce_the_loss():
    config, codes, labels = tiny_task(48)
    tc = TrainConfig(steps=60, batch_size=16, lr=1e-2, warmup_steps=5, threads=1, log_every=60, seed=0)
    task = ELMMLMTask(config, codes, labels)
    fixed = position_mask(len(codes), config.block_size, torch.Generator().manual_seed(7))

    def loss_of(state):
        module = ELMMLMTransformer(config)
        module.load_state_dict(state)
        with torch.no_grad():
            return float(mlm_loss(module.eval(), codes, labels, fixed)[0])

    torch.manual_seed(0)
    initial = task.init_weights(task.build()).state_dict()
    result = train(config, tc, task=task, log=None)
    before, after = loss_of(initial), loss_of(result["model"])
    assert before > math.log(config.vocab_size) - 0.1        # zero-information start: ~log 8
    assert after < 0.7 * before, (before, after)


def test_task_refuses_codes_that_do_not_fit():
    from engine.core.errors import ConfigError

    config, codes, labels = tiny_task(6)
    with pytest.raises(ConfigError, match="block_size"):
        ELMMLMTask(config, codes[:, :2], labels)
    with pytest.raises(ConfigError, match="sub-tokens"):
        ELMMLMTask(config, codes + config.vocab_size, labels)
    with pytest.raises(ConfigError, match="labels"):
        ELMMLMTask(config, codes, labels + 5)


# The shipped model ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shipped():
    return engine.load("digits-elm-mlm")


def test_shipped_model_loads_offline_from_any_directory(monkeypatch, tmp_path):
    from safetensors.torch import load_file

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = engine.load("digits-elm-mlm")
    root = BUILTIN_MODELS["digits-elm-mlm"]
    meta = json.loads((root / "config.json").read_text())
    assert model.family == "elm-mlm" and meta["family"] == "elm-mlm" and model.bae is not None
    assert {k: meta["config"][k] for k in DIGITS_ELM_MLM} == DIGITS_ELM_MLM
    assert meta["sampling"] == model.sampling_defaults and "command" in meta["training"]
    # Its decoder is the built-in digits BAE whose codes it was trained on.
    ours, builtin = load_file(str(root / "bae" / "bae.safetensors")), \
        load_file(str(BUILTIN_MODELS["digits-elm-mlm"].parent / "digits-bae" / "bae.safetensors"))
    assert ours.keys() == builtin.keys() and all(torch.equal(ours[k], builtin[k]) for k in ours)
    images = engine.generate(model, labels=list(range(10)), output_type="np")
    assert images.shape == (10, 16, 16, 1) and images.dtype == np.float32
    assert np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1


# Issue 13's bar (98.6% over 50 per class, docs/digits-discrete/elm_mlm.json). The same model
# with ELM's released pos_type rope2d reached 83.6%: its masked sub-tokens were indistinguishable.
MIN_ACCURACY = 0.85


def test_shipped_model_accuracy_at_its_defaults(shipped):
    from engine.builtin.evaluate import evaluate_samples, generate_digits, make_reference

    d = shipped.sampling_defaults
    ref = make_reference(16, 10)
    images, labels = generate_digits(shipped, 10, d["cfg"], d["num_iter"], d["temperature"], seed=0)
    assert images.shape == (100, 1, 16, 16)
    result = evaluate_samples(ref, images, labels)
    assert result["accuracy"] >= MIN_ACCURACY, result
