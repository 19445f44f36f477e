"""How the files beside this script were made: outputs of the PUBLISHED ELM code
(github Pepper-lll/LMforImageGeneration, commit c2f29f0ac9775dd917f315f0ff18f00d42b97f7a:
`llama/ar_model.py` Transformer / ModelArgs / generate_cfg, `bae/binaryae.py` BinaryAutoEncoder)
for small random configurations. Not run by the tests (it needs the published code).

Run (CPU, torch 2.13.0+cpu, numpy, einops, tqdm, safetensors; a plain venv, 1 thread):
    ELM=/tmp/elm python tests/data/elm/make_elm_outputs.py
where /tmp/elm is an extracted checkout of the published repository (imported from there; nothing
of it is copied here). `.cuda()` is made a no-op (bae's Generator calls it on `logsigma`).
bae/binaryae.py imports LPIPS (torchvision VGG), the training data / logging helpers and
torch.distributed, none of which decoding touches: `bae.lpips`, `utils.data_utils` and
`utils.log_utils` get stand-in modules, and binaryae.py is loaded without running
bae/__init__.py (which imports the diffusion sampler). `utils.vqgan_utils.normalize` (GroupNorm)
is the published one.

Files (all written next to this script):
  ck_<name>.pth        bare state dicts, as ELM ships its GPT checkpoints (torch.save of
                       Transformer.state_dict()). The Transformer is built as
                       Transformer(ModelArgs(**configs[name])) after torch.manual_seed(0); then every
                       parameter is replaced (torch.Generator seeded 1, named_parameters order): RMSNorm
                       gains 1 + 0.1 randn, output heads 2 randn / sqrt(dim), everything else
                       randn / sqrt(last dim) (the published init zeroes the heads: uniform logits).
  tokens.safetensors   `<run>.tokens` / `<run>.logits`: what generate_cfg returned for each run of
                       runs.json, after torch.manual_seed(seed), eval(), no_grad; `<run>.after`:
                       torch.rand(4) right after the call (the RNG state it left); `<run>.prefix`:
                       the idx argument when not None.
                       `forward.<name>` / `forward.<name>.idx` / `forward.<name>.cond`: the published
                       forward(idx, cond) logits [B, (S+1)*token_each, V] for random idx.
  runs.json            configs (ModelArgs kwargs), runs (config, seed, cond, num_iter, temperature,
                       top_k, cfg_scale, cfg_schedule, scale_pow, remask, prefix), failures (calls the
                       published code cannot run, with the exception it raised), bae (its H).
  binaryae_ema.th      a BinaryAutoEncoder(H) (torch.manual_seed(3), then parameters replaced,
                       Generator seeded 4: norms 1 + 0.1 randn, biases 0.1 randn, others
                       randn / sqrt(fan in)), saved in ELM's binaryae_ema.th layout: its state dict with
                       an `ae.` prefix (what ELM's load_pretrain strips) plus a stand-in `disc.` tensor
                       (a BinaryGAN's discriminator; load_pretrain drops it). Values are rounded to
                       float16 and stored as float16 (keeps the file small; loading casts to float32
                       exactly).
  bae.safetensors      `<k>.indices` [B, 16, 2] and `<k>.images` = the published
                       BinaryAutoEncoder.decode(bits, is_bin=True) of them, bits built as ELM's sample.py
                       does (each sub-token's code_dim bits most significant first, sub-tokens
                       concatenated, positions row-major); `run_a_linear.images`: the tokens of run
                       a_linear decoded the same way.
"""
import importlib.util
import json
import math
import os
import sys
import types
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
ELM = Path(os.environ.get("ELM", "/tmp/elm"))
torch.set_num_threads(1)
torch.nn.Module.cuda = lambda self, *a, **k: self
torch.Tensor.cuda = lambda self, *a, **k: self

CONFIGS = {
    # token_each 2, 4x4 grid, 16 sub-token values
    "a": dict(dim=48, n_layer=2, n_head=4, token_each=2, code_dim=4, block_size=16, num_classes=10,
              multiple_of=32),
    # grouped-query attention, an 8x8 grid, ffn_dim_multiplier, other eps / rope base
    "b": dict(dim=64, n_layer=2, n_head=2, n_kv_head=1, token_each=2, code_dim=5, block_size=64,
              num_classes=5, multiple_of=16, ffn_dim_multiplier=0.75, norm_eps=1e-6, rope_base=500.0),
    # token_each 1 (one embedding, one head) and two class-token RoPE rows (cls_token_num 2)
    "c": dict(dim=32, n_layer=2, n_head=2, token_each=1, code_dim=6, block_size=16, num_classes=7,
              multiple_of=32, cls_token_num=2),
}

RUNS = [
    # name, config, seed, cond, num_iter, kwargs of generate_cfg (defaults otherwise)
    ("a_cfg1", "a", 0, [1, 4], 16, dict(cfg_scale=1.0)),
    ("a_linear", "a", 1, [0, 9], 16, dict(cfg_scale=4.0, cfg_schedule="linear", top_k=5)),
    ("a_cos", "a", 2, [3, 3], 16, dict(cfg_scale=3.0, cfg_schedule="cos", temperature=0.7)),
    ("a_log", "a", 3, [2, 5], 16, dict(cfg_scale=2.5, cfg_schedule="log", top_k=8, temperature=1.3)),
    ("a_square", "a", 4, [7, 1], 16, dict(cfg_scale=2.0, cfg_schedule="square")),
    ("a_sqrt", "a", 5, [6, 8], 16, dict(cfg_scale=3.0, cfg_schedule="square_root", top_k=3)),
    ("a_defaults", "a", 6, [4, 2], 16, dict()),                       # cfg_scale 10, constant
    ("a_short", "a", 7, [5], 7, dict(cfg_scale=1.5, top_k=4)),
    ("a_over", "a", 8, [1, 2], 17, dict(cfg_scale=2.0)),             # cls_token_num + block_size tokens
    ("a_topk_big", "a", 9, [0, 1], 16, dict(cfg_scale=1.5, top_k=1000, remask=True)),
    ("b_linear", "b", 10, [0, 4], 64, dict(cfg_scale=1.5, cfg_schedule="linear", top_k=10, temperature=0.9)),
    ("b_pow", "b", 11, [2, 3], 64, dict(cfg_scale=2.0, cfg_schedule="cos", scale_pow=2.0)),
    ("b_prefix", "b", 12, [1, 3], 54, dict(cfg_scale=3.0, top_k=6, prefix=10)),
    ("c_const", "c", 13, [0, 3, 6], 16, dict(cfg_scale=2.0, top_k=4)),
    ("c_sqrt", "c", 14, [5, 2, 6], 16, dict(cfg_scale=4.0, cfg_schedule="square_root", temperature=1.5)),
    ("c_null", "c", 15, [7, 1], 16, dict(cfg_scale=3.0, cfg_schedule="linear")),  # cond = the null class
]

BAE_H = dict(n_channels=3, nf=32, res_blocks=1, codebook_size=8, emb_dim=32, ch_mult=[2, 1], img_size=8,
             attn_resolutions=[4], quantizer="binary", beta=0.25, deterministic=False, use_tanh=False,
             norm_first=True, gen_mul=1.0)


def import_published():
    sys.path.insert(0, str(ELM))
    from llama import ar_model

    def standin(name, **attrs):
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        sys.modules[name] = module
        return module

    noop = lambda *a, **k: None  # noqa: E731
    standin("utils.data_utils", get_data_loaders=noop, BigDataset=object, NoClassDataset=object, get_datasets=noop)
    standin("utils.log_utils", load_model=noop, load_stats=noop, log=noop, save_images=noop)
    package = standin("bae")
    package.__path__ = [str(ELM / "bae")]
    standin("bae.lpips", LPIPS=object)
    spec = importlib.util.spec_from_file_location("bae.binaryae", ELM / "bae" / "binaryae.py")
    binaryae = importlib.util.module_from_spec(spec)
    sys.modules["bae.binaryae"] = binaryae
    spec.loader.exec_module(binaryae)
    return ar_model, binaryae


def randomise_gpt(model, dim):
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * noise)
            elif name.startswith("output"):
                p.copy_(2 * noise / math.sqrt(dim))
            else:
                p.copy_(noise / math.sqrt(p.shape[-1]))


def randomise_bae(model):
    gen = torch.Generator().manual_seed(4)
    norms = {n for n, m in model.named_modules() if isinstance(m, torch.nn.GroupNorm)}
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            owner = name.rsplit(".", 1)[0]
            if owner in norms and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise / math.sqrt(max(p[0].numel(), 1)))
            p.copy_(p.half().float())


def bits_of(indices, code_dim):
    """ELM's sample.py: sub-token index -> code_dim bits, most significant first; [B, K, h, w]."""
    b, length, _ = indices.shape
    codes = torch.arange(2 ** code_dim)
    weights = 2 ** torch.arange(code_dim - 1, -1, -1)
    codebook = ((codes[..., None] & weights) != 0).float()
    side = int(length ** 0.5)
    return codebook[indices].reshape(b, length, -1).permute(0, 2, 1).reshape(b, -1, side, side)


@torch.no_grad()
def main():
    ar_model, binaryae = import_published()
    out, runs, failures = {}, [], []
    models = {}
    for name, kwargs in CONFIGS.items():
        torch.manual_seed(0)
        model = ar_model.Transformer(ar_model.ModelArgs(**kwargs)).eval()
        randomise_gpt(model, kwargs["dim"])
        torch.save(model.state_dict(), HERE / f"ck_{name}.pth")
        models[name] = model
        gen = torch.Generator().manual_seed(100)
        token_each, vocab = kwargs["token_each"], 2 ** kwargs["code_dim"]
        idx = torch.randint(0, vocab, (2, 5, token_each), generator=gen)
        cond = torch.randint(0, kwargs["num_classes"], (2,), generator=gen)
        out[f"forward.{name}"] = model(idx=idx, cond=cond)[0].contiguous()
        out[f"forward.{name}.idx"], out[f"forward.{name}.cond"] = idx, cond

    for run, name, seed, cond, num_iter, kwargs in RUNS:
        kwargs = dict(kwargs)
        model, c = models[name], CONFIGS[name]
        prefix = None
        if "prefix" in kwargs:
            gen = torch.Generator().manual_seed(200 + seed)
            prefix = torch.randint(0, 2 ** c["code_dim"], (len(cond), kwargs.pop("prefix"), c["token_each"]),
                                   generator=gen)
            out[f"{run}.prefix"] = prefix
        cond_t = torch.tensor(cond)
        torch.manual_seed(seed)
        tokens, logits = model.generate_cfg(idx=prefix, cond=cond_t, num_iter=num_iter, **kwargs)
        out[f"{run}.tokens"], out[f"{run}.logits"] = tokens.contiguous(), logits.contiguous()
        out[f"{run}.after"] = torch.rand(4)
        runs.append(dict(name=run, config=name, seed=seed, cond=cond_t.tolist(), num_iter=num_iter,
                         prefix=f"{run}.prefix" if prefix is not None else None,
                         **{k: kwargs.get(k, d) for k, d in (("temperature", 1.0), ("top_k", None),
                                                             ("remask", False), ("cfg_scale", 10.0),
                                                             ("cfg_schedule", "constant"), ("scale_pow", 1.0))}))
        print(run, tuple(tokens.shape))

    model = models["a"]
    for what, call in {
        "unknown cfg_schedule": lambda: model.generate_cfg(None, torch.tensor([1]), 4, cfg_schedule="foo"),
        "cond=None": lambda: model.generate_cfg(None, None, 4),
        "top_k=0": lambda: model.generate_cfg(None, torch.tensor([1]), 4, top_k=0),
        "temperature=0": lambda: model.generate_cfg(None, torch.tensor([1]), 4, temperature=0.0),
        "num_iter > cls_token_num + block_size": lambda: model.generate_cfg(None, torch.tensor([1]), 18),
    }.items():
        try:
            call()
            failures.append(dict(call=what, error=None))
        except Exception as err:  # record what the published code does
            failures.append(dict(call=what, error=f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"))

    # BAE ------------------------------------------------------------------------------------
    torch.manual_seed(3)
    bae = binaryae.BinaryAutoEncoder(types.SimpleNamespace(**BAE_H)).eval()
    randomise_bae(bae)
    ckpt = {f"ae.{k}": v.half() for k, v in bae.state_dict().items()}
    ckpt["disc.main.0.weight"] = torch.randn(8, 3, 4, 4).half()
    torch.save(ckpt, HERE / "binaryae_ema.th")
    bae_out = {}
    code_dim = BAE_H["codebook_size"] // 2
    gen = torch.Generator().manual_seed(300)
    for k in range(2):
        indices = torch.randint(0, 2 ** code_dim, (2 + k, 16, 2), generator=gen)
        bae_out[f"{k}.indices"] = indices
        bae_out[f"{k}.images"] = bae.decode(bits_of(indices, code_dim), is_bin=True).contiguous()
    bae_out["run_a_linear.images"] = bae.decode(bits_of(out["a_linear.tokens"], code_dim), is_bin=True).contiguous()
    save_file(bae_out, str(HERE / "bae.safetensors"))

    save_file(out, str(HERE / "tokens.safetensors"))
    meta = dict(source="github Pepper-lll/LMforImageGeneration c2f29f0ac9775dd917f315f0ff18f00d42b97f7a",
                torch=torch.__version__, configs=CONFIGS, runs=runs, failures=failures, bae=BAE_H)
    (HERE / "runs.json").write_text(json.dumps(meta, indent=1) + "\n")
    for f in failures:
        print(f)


if __name__ == "__main__":
    main()
