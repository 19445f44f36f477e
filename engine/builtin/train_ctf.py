"""Training CTF's two stages (engine.families.ctf) on discrete codes [N, L, token_each].

    loss, stats = ctf_losses(module, codes, labels, label_drop_prob=0.1, generator=g)

  stage 1  next-coarse-label cross-entropy by teacher forcing: the class position and the coarse
           labels 0..L-2 predict the coarse labels 0..L-1 (the causal AR model over clusters);
  stage 2  fine-label cross-entropy given the true coarse labels: one bidirectional pass, one
           cross-entropy per sub-token head (the fine label = the codebook index, split into
           ELM-style sub-tokens), averaged over tokens and sub-tokens.
Each stage replaces the class by the null class with probability `label_drop_prob`, drawn
independently per stage (what CFG reads at sampling time). The total is the sum.

`CTFTask` is engine.builtin.training's task protocol (build, init_weights, loss, start / state / load_state):
it clusters the codebook once (k-means on the codewords, e.g. engine.models.ctf.bae_codewords of
the BAE), then trains both stages jointly in the one loop.
"""
from __future__ import annotations

import torch

from ..families.ctf import FAMILY_NAME as CTF_FAMILY
import torch.nn as nn
import torch.nn.functional as F

from ..core.errors import ConfigError
from ..models.ctf import subtokens_to_codes


def _drop(labels: torch.Tensor, null_class: int, prob: float, generator) -> torch.Tensor:
    if prob <= 0:
        return labels
    drop = torch.rand(labels.shape, generator=generator, device=generator.device if generator else "cpu") < prob
    return torch.where(drop.to(labels.device), torch.full_like(labels, null_class), labels)


def check_codes(codes: torch.Tensor, labels: torch.Tensor, config) -> None:
    c = config
    if not isinstance(codes, torch.Tensor) or codes.is_floating_point() or codes.ndim != 3 \
            or tuple(codes.shape[1:]) != (c.block_size, c.token_each):
        raise ConfigError(f"codes must be integers [N, {c.block_size}, {c.token_each}] (block_size, token_each), "
                          f"got {getattr(codes, 'dtype', type(codes).__name__)} {list(getattr(codes, 'shape', []))}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= c.sub_vocab):
        raise ConfigError(f"codes must be sub-tokens in 0..{c.sub_vocab - 1} (code_dim {c.code_dim})")
    if labels.shape != codes.shape[:1] or labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= c.num_classes):
        raise ConfigError(f"labels must be [N] classes in 0..{c.num_classes - 1}")


def ctf_losses(module, codes: torch.Tensor, labels: torch.Tensor, label_drop_prob: float = 0.1,
               generator=None) -> tuple[torch.Tensor, dict]:
    """(stage-1 CE + stage-2 CE, statistics) of engine.models.ctf.CTFModule `module` on codes
    [B, L, token_each] (sub-tokens) and labels [B]."""
    c = module.config
    if label_drop_prob > 0 and not c.has_null_class:
        raise ConfigError("label dropout needs the CFG null class: class_dropout_prob must be > 0")
    bsz, length, _ = codes.shape
    coarse = module.cluster_of[subtokens_to_codes(codes, c.code_dim)]              # [B, L]
    labels1 = _drop(labels, c.num_classes, label_drop_prob, generator)
    labels2 = _drop(labels, c.num_classes, label_drop_prob, generator)
    logits1 = module.stage1(coarse[:, :-1, None], labels1)                         # [B, L, K]
    ce1 = F.cross_entropy(logits1.transpose(1, 2), coarse)
    logits2 = module.stage2(coarse, labels2)                                       # [B, L, T, Vs]
    ce2 = F.cross_entropy(logits2.reshape(-1, c.sub_vocab), codes.reshape(-1))
    with torch.no_grad():
        acc1 = (logits1.argmax(-1) == coarse).float().mean()
        acc2 = (logits2.argmax(-1) == codes).all(-1).float().mean()
    return ce1 + ce2, {"ce_coarse": float(ce1.detach()), "ce_fine": float(ce2.detach()),
                       "acc_coarse": float(acc1), "acc_fine": float(acc2)}


@torch.no_grad()
def init_ctf_weights(module: nn.Module) -> nn.Module:
    """N(0, 0.02) linears and embeddings (LlamaGen / ELM's initializer_range), output heads at zero."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
    for stage in (module.stage1, module.stage2):
        heads = stage.output if isinstance(stage.output, nn.ModuleList) else [stage.output]
        for head in heads:
            nn.init.zeros_(head.weight)
    return module


class CTFTask:
    """engine.builtin.training task: both CTF stages on (codes, labels), with the cluster map `cluster_of`
    fixed before training (it is a buffer, not trained; train() returns parameters only, so add
    it back to the EMA state when saving: `{**result["ema"], "cluster_of": task.cluster_of}`)."""

    name = CTF_FAMILY
    stat_names = ("ce_coarse", "ce_fine")

    def __init__(self, config, codes: torch.Tensor, labels: torch.Tensor, cluster_of: torch.Tensor):
        from ..families.ctf import check_cluster_map

        check_codes(codes, labels, config)
        check_cluster_map(cluster_of, config, "CTFTask")
        if not config.has_null_class:
            raise ConfigError("class_dropout_prob must be > 0: the CFG null class is trained by dropout")
        self.config, self.codes, self.labels = config, codes, labels
        self.cluster_of = cluster_of.to(torch.int64)
        self.perm, self.cursor = None, 0

    def build(self):
        from ..models.ctf import CTFModule

        module = CTFModule(self.config)
        module.cluster_of.copy_(self.cluster_of)
        return module

    def init_weights(self, module: nn.Module) -> nn.Module:
        return init_ctf_weights(module)

    def start(self, generator) -> None:
        self.perm, self.cursor = torch.randperm(len(self.codes), generator=generator), 0

    def state(self) -> dict:
        return {"perm": self.perm, "cursor": self.cursor}

    def load_state(self, state: dict) -> None:
        self.perm, self.cursor = state["perm"], state["cursor"]

    def loss(self, model, tables, step: int, batch_size: int, generator, tc):
        if self.cursor + batch_size > len(self.codes):
            self.start(generator)
        idx = self.perm[self.cursor:self.cursor + batch_size]
        self.cursor += batch_size
        loss, stats = ctf_losses(model, self.codes[idx], self.labels[idx], tc.label_drop_prob, generator)
        return loss, stats


# The built-in digits-ctf ------------------------------------------------------------------------------
# Trained on the digits BAE codes (engine.builtin.discrete_digits: 16 positions of 2 sub-tokens of 8 bits,
# codebook 2 ** 16); the clusters are k-means on all 65536 codewords.
DIGITS_CTF = dict(num_classes=10, class_dropout_prob=0.1, block_size=16, token_each=2, code_dim=8,
                  num_clusters=64,
                  stage1=dict(dim=128, n_layer=4, n_head=4, multiple_of=64),
                  stage2=dict(dim=128, n_layer=2, n_head=4, multiple_of=64))
DIGITS_CTF_TRAINING = dict(steps=2500, batch_size=64, threads=1, warmup_steps=100)
DIGITS_CTF_SAMPLING = dict(cfg=2.0, temperature=1.1, top_k=None, top_p=None, cfg_schedule="constant")
KMEANS_SEED = 0


def digits_ctf_config(**overrides):
    from ..families.ctf import CTFConfig

    return CTFConfig.from_dict({**DIGITS_CTF, **overrides})


def digits_cluster_map(config, bae) -> torch.Tensor:
    """k-means (seed KMEANS_SEED) on the codewords of every code of the digits BAE."""
    from ..models.ctf import bae_codewords, kmeans_cluster_map

    words = bae_codewords(bae.quantize.embed.weight, config.token_each, config.code_dim)
    return kmeans_cluster_map(words, config.num_clusters, seed=KMEANS_SEED)


def run(args) -> int:
    """`python -m engine train --model digits-ctf --out DIR [--bae BAE_DIR]`: cluster, train both
    stages, write DIR as an engine-ctf directory with the BAE it decodes with in DIR/bae."""
    import dataclasses
    import json
    import time
    from pathlib import Path

    from .discrete_digits import digits_codes, load_digits_bae, save_digits_bae
    from ..families.ctf import CTFModel, save_ctf
    from .training import _command_line
    from .train_discrete import sampling_with, train_task

    out, bae_path = Path(args.out), getattr(args, "bae", None)
    config = digits_ctf_config()
    bae = load_digits_bae(bae_path)
    if bae.config.token_each != config.token_each or bae.config.code_dim != config.code_dim:
        raise ConfigError(f"the BAE's codes ({bae.config.token_each} x {bae.config.code_dim} bits) do not fit "
                          f"digits-ctf ({config.token_each} x {config.code_dim})")
    start = time.time()
    cluster_of = digits_cluster_map(config, bae)
    print(f"k-means: {config.codebook_size} codewords into {config.num_clusters} clusters in "
          f"{time.time() - start:.1f}s", flush=True)
    codes, labels = digits_codes("train", bae_path)
    task = CTFTask(config, codes, labels, cluster_of)
    tc, result = train_task("digits-ctf", config, task, DIGITS_CTF_TRAINING, args)
    resume = out / "resume.pt"
    module = task.build()
    module.load_state_dict({**result["ema"], "cluster_of": cluster_of})
    model = CTFModel(module)
    sampling = sampling_with(DIGITS_CTF_SAMPLING, args)
    training = {**dataclasses.asdict(tc), "command": _command_line(args),
                "data": f"codes of the engine.digits train split under {bae_path or 'the built-in digits-bae'}",
                "clusters": f"sklearn KMeans(n_clusters={config.num_clusters}, random_state={KMEANS_SEED}) on "
                            "the BAE codewords (bits x quantize.embed.weight) of all codes",
                "final": result["history"][-1], "seconds": round(result["seconds"], 1), "weights": "ema"}
    dtype = getattr(torch, getattr(args, "weights_dtype", None) or "float32")
    training["weights_dtype"] = str(dtype).removeprefix("torch.")
    save_ctf(model, out, sampling, {"training": training}, dtype=dtype)
    save_digits_bae(bae, out / "bae")         # the companion decoder of its codes
    (out / "history.json").write_text(json.dumps(result["history"], indent=1) + "\n")
    resume.unlink(missing_ok=True)
    print(f"wrote {out} after {result['seconds']:.0f}s")
    return 0
