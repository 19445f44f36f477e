"""How the files beside this script were made: outputs of the PUBLISHED ELM masked model
(github Pepper-lll/LMforImageGeneration, commit c2f29f0ac9775dd917f315f0ff18f00d42b97f7a,
`llama/mlm_model.py` Transformer / ModelArgs / generate_cfg) for small random configurations.
Not run by the tests (it needs the published code).

Run (CPU, torch 2.13.0+cpu, numpy 2.4, einops, safetensors; a plain venv, 1 thread):
    ELM=/tmp/elm python tests/data/elm_mlm/make_elm_mlm_outputs.py
where /tmp/elm is an extracted checkout of the published repository (imported from there; nothing
of it is copied here). Two things are supplied from the outside, without editing their file:
  * `model_type`: the published ModelArgs has no such field but Transformer.__init__ reads
    `config.model_type`, so `Transformer(ModelArgs(...))` raises AttributeError. The instance
    gets the attribute (`args.model_type = "c2i"`) before construction (recorded in failures).
  * `scipy.stats`: imported at the top of mlm_model.py, never used by it; a stand-in module.

Files (all written next to this script):
  ck_<name>.pth        bare state dicts (torch.save of Transformer.state_dict(), as ELM ships its
                       GPT checkpoints). Built as Transformer(args) after torch.manual_seed(0);
                       then every parameter is replaced (torch.Generator seeded 1,
                       named_parameters order): RMSNorm / LayerNorm gains 1 + 0.1 randn, biases
                       0.1 randn, everything else randn / sqrt(last dim). Stored as float16
                       values (rounded first, so loading casts to float32 exactly; keeps the
                       files small); the published model samples with the rounded values.
  tokens.safetensors   `<run>.tokens` / `<run>.logits`: what generate_cfg returned for each run of
                       runs.json, after torch.manual_seed(seed); np.random.seed(seed), eval(),
                       no_grad; `<run>.after`: torch.rand(4) right after the call and
                       `<run>.np_after`: np.random.random(4) (the RNG states it left).
                       `forward.<name>` / `.idx` / `.cond`: the published forward(idx, cond,
                       token_all_mask=idx == mask id) logits [B, S * token_each, 2**code_dim] for
                       random idx with about half the positions masked.
  runs.json            configs (ModelArgs kwargs), runs (config, seed, cond, num_iter, temperature,
                       top_k, cfg_scale, cfg_schedule, scale_pow, remask), failures (calls the
                       published code cannot run, with the exception it raised).
"""
import json
import os
import sys
import types
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
ELM = Path(os.environ.get("ELM", "/tmp/elm"))
torch.set_num_threads(1)
torch.nn.Module.cuda = lambda self, *a, **k: self
torch.Tensor.cuda = lambda self, *a, **k: self

CONFIGS = {
    # token_each 2 on a 4x4 grid, 16 sub-token values, cos mask schedule (ModelArgs' default)
    "a": dict(dim=48, n_layer=2, n_head=4, token_each=2, code_dim=4, block_size=16, num_classes=10,
              multiple_of=32),
    # token_each 1 on an 8x8 grid, grouped-query attention, linear mask schedule, other eps / base
    "b": dict(dim=64, n_layer=2, n_head=2, n_kv_head=1, token_each=1, code_dim=5, block_size=64,
              num_classes=5, multiple_of=16, ffn_dim_multiplier=0.75, norm_eps=1e-6, rope_base=500.0,
              mask_schtype="linear"),
    # token_each 3, pause (one more embedding row), 8 sub-token values
    "c": dict(dim=32, n_layer=1, n_head=2, token_each=3, code_dim=3, block_size=16, num_classes=7,
              multiple_of=32, pause=True),
    # token_each 2 with 1D RoPE over every sub-token (the published pos_type='rope1d')
    "d": dict(dim=32, n_layer=2, n_head=2, token_each=2, code_dim=4, block_size=16, num_classes=6,
              multiple_of=32, pos_type="rope1d"),
}

RUNS = [
    # name, config, seed, cond, kwargs of generate_cfg (defaults otherwise)
    ("a_cfg1", "a", 0, [1, 4], dict(num_iter=8, cfg_scale=1.0)),
    ("a_const", "a", 1, [0, 9], dict(cfg_scale=3.0, temperature=0.7)),
    ("a_linear", "a", 2, [3, 3], dict(num_iter=6, cfg_scale=4.0, cfg_schedule="linear", temperature=1.5, top_k=5)),
    ("a_defaults", "a", 3, [2, 5], dict()),                        # num_iter 10, cfg_scale 10, constant
    ("a_remask", "a", 4, [7, 1], dict(num_iter=8, cfg_scale=2.0, remask=True, temperature=2.0)),
    ("a_powercos", "a", 5, [6, 8], dict(num_iter=5, cfg_scale=3.0, cfg_schedule="powercos", scale_pow=2.0)),
    ("a_many", "a", 6, [4], dict(num_iter=20, cfg_scale=1.5, top_k=3)),    # more steps than positions
    ("a_one", "a", 7, [0, 1], dict(num_iter=1, cfg_scale=2.0)),
    ("a_temp0", "a", 8, [5, 2], dict(num_iter=6, cfg_scale=2.0, temperature=0.0)),
    ("b_linear", "b", 10, [0, 4, 2], dict(num_iter=12, cfg_scale=2.0, cfg_schedule="linear", temperature=0.8,
                                          top_k=3)),
    ("b_cfg1_remask", "b", 11, [1, 3], dict(num_iter=10, cfg_scale=1.0, temperature=4.5, remask=True)),
    ("b_null", "b", 12, [5, 2], dict(num_iter=8, cfg_scale=3.0)),            # cond = the null class
    ("c_const", "c", 13, [0, 3, 6], dict(num_iter=7, cfg_scale=2.5, temperature=0.5)),
    ("c_linear", "c", 14, [5, 2], dict(num_iter=10, cfg_scale=1.5, cfg_schedule="linear", remask=True, top_k=4)),
    ("d_const", "d", 15, [1, 5], dict(num_iter=8, cfg_scale=2.0, temperature=1.5)),
    ("d_linear_remask", "d", 16, [0, 3, 4], dict(num_iter=6, cfg_scale=3.0, cfg_schedule="linear", remask=True)),
]
DEFAULTS = dict(num_iter=10, temperature=1.0, top_k=None, cfg_scale=10.0, remask=False, cfg_schedule="constant",
                scale_pow=1.0)


def import_published():
    sys.path.insert(0, str(ELM))
    scipy = types.ModuleType("scipy")
    scipy.stats = types.ModuleType("scipy.stats")
    sys.modules.setdefault("scipy", scipy)
    sys.modules.setdefault("scipy.stats", scipy.stats)
    from llama import mlm_model
    return mlm_model


def build(mlm_model, kwargs):
    args = mlm_model.ModelArgs(**kwargs)
    args.model_type = "c2i"            # the field the published ModelArgs lacks
    return mlm_model.Transformer(args)


def randomise(model):
    gen = torch.Generator().manual_seed(1)
    gains = {n for n, m in model.named_modules()
             if type(m).__name__ == "RMSNorm" or isinstance(m, torch.nn.LayerNorm)}
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            owner, leaf = name.rsplit(".", 1) if "." in name else ("", name)
            if owner in gains and leaf == "weight":
                p.copy_(1 + 0.1 * noise)
            elif leaf == "bias":
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise / p.shape[-1] ** 0.5)
            p.copy_(p.half().float())


@torch.no_grad()
def main():
    mlm_model = import_published()
    out, runs, failures, models = {}, [], [], {}
    for name, kwargs in CONFIGS.items():
        torch.manual_seed(0)
        model = build(mlm_model, kwargs).eval()
        randomise(model)
        torch.save({k: v.half() for k, v in model.state_dict().items()}, HERE / f"ck_{name}.pth")
        models[name] = model
        gen = torch.Generator().manual_seed(100)
        t, vocab, s = kwargs["token_each"], 2 ** kwargs["code_dim"], kwargs["block_size"]
        idx = torch.randint(0, vocab, (2, s, t), generator=gen)
        idx[torch.rand(2, s, generator=gen) < 0.5] = model.mask_token_label
        cond = torch.randint(0, kwargs["num_classes"], (2,), generator=gen)
        logits, _, _ = model(idx=idx.clone(), cond=cond, token_all_mask=idx == model.mask_token_label)
        out[f"forward.{name}"] = logits.contiguous()
        out[f"forward.{name}.idx"], out[f"forward.{name}.cond"] = idx, cond

    for run, name, seed, cond, kwargs in RUNS:
        settings = {**DEFAULTS, **kwargs}
        cond_t = torch.tensor(cond)
        torch.manual_seed(seed)
        np.random.seed(seed)
        tokens, logits = models[name].generate_cfg(None, cond_t, **settings)
        out[f"{run}.tokens"], out[f"{run}.logits"] = tokens.contiguous(), logits.contiguous()
        out[f"{run}.after"] = torch.rand(4)
        out[f"{run}.np_after"] = torch.from_numpy(np.random.random(4))
        runs.append(dict(name=run, config=name, seed=seed, cond=cond, **settings))
        print(run, tuple(tokens.shape), tuple(logits.shape))

    model = models["a"]
    no_null = dict(CONFIGS["a"], class_dropout_prob=0.0)
    two_cls = dict(CONFIGS["a"], cls_token_num=2)
    for what, call in {
        "ModelArgs without model_type": lambda: mlm_model.Transformer(mlm_model.ModelArgs(**CONFIGS["a"])),
        "unknown cfg_schedule": lambda: model.generate_cfg(None, torch.tensor([1]), 4, cfg_schedule="foo"),
        "cond=None": lambda: model.generate_cfg(None, None, 4),
        "num_iter=0": lambda: model.generate_cfg(None, torch.tensor([1]), 0),
        "class_dropout_prob=0": lambda: build(mlm_model, no_null).eval().generate_cfg(None, torch.tensor([1]), 4),
        "cls_token_num=2": lambda: build(mlm_model, two_cls).eval().generate_cfg(None, torch.tensor([1]), 4),
        "top_k=0 (unused)": lambda: model.generate_cfg(None, torch.tensor([1]), 2, top_k=0),
    }.items():
        try:
            call()
            failures.append(dict(call=what, error=None))
        except Exception as err:  # record what the published code does
            failures.append(dict(call=what, error=f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"))

    save_file(out, str(HERE / "tokens.safetensors"))
    meta = dict(source="github Pepper-lll/LMforImageGeneration c2f29f0ac9775dd917f315f0ff18f00d42b97f7a",
                torch=torch.__version__, numpy=np.__version__, configs=CONFIGS, runs=runs, failures=failures)
    (HERE / "runs.json").write_text(json.dumps(meta, indent=1) + "\n")
    for f in failures:
        print(f)


if __name__ == "__main__":
    main()
