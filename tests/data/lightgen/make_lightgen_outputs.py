"""How the files beside this script were made: outputs of the PUBLISHED LightGen code (public
reimplementation of Fluid, the text-to-image MAR; github XianfengWu01/LightGen, commit
279299183badbf899d63d0901b248e2086ccf213, `models/fluid_arbitrary.py` class FLUID) for small random
configurations. Not run by the tests (it needs the published code).

Run (CPU, torch 2.13.0+cpu, timm 1.0.31, diffusers 0.42.1, numpy 2.4.6, scipy 1.17.1, 2 threads):
    LIGHTGEN=/tmp/lightgen python tests/data/lightgen/make_lightgen_outputs.py          # goldens
    LIGHTGEN=/tmp/lightgen python tests/data/lightgen/make_lightgen_outputs.py --bench  # timing only
where /tmp/lightgen is an extracted checkout of the published repository (it is imported from there;
nothing of it is copied here). The published `.cuda()` calls are made no-ops. timm imports torchvision
at import time (data transforms, FrozenBatchNorm2d) which FLUID never uses; when torchvision does not
import, a stand-in module is installed (it touches no computation).

Files (all written next to this script):
  ck_<name>.pth       LightGen's training-checkpoint format (util/misc.py save_model):
                      {"model": raw state_dict, "model_ema": EMA state_dict, "epoch": 0,
                       "args": argparse.Namespace(model="custom", **constructor kwargs)}.
                      FLUID is built as FLUID(norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs) with
                      kwargs = vars(args) minus "model" (mlp_ratio=4.0 is in args). After construction
                      (torch.manual_seed(0)) every parameter gets p += 0.05*randn (torch.manual_seed(1)) ->
                      "model"; a second p += 0.05*randn (torch.manual_seed(2)) on top -> "model_ema".
  tokens.safetensors  `<name>.<k>`: what FLUID.sample_tokens returned for run k of config <name>,
                      shape [bsz, vae_embed_dim, seq_h*patch, seq_w*patch], after
                      torch.manual_seed(seed); np.random.seed(seed), under torch.no_grad(), eval(),
                      on a FRESH FLUID built from the checkpoint's args and loaded with runs[i]["weights"].
                      Scale: p1 ("10") and uneq ("8") respacings include t=999 (cosine alpha_bar ~2.4e-9),
                      where random weights' eps error is amplified ~2e4x: tokens have std ~2e4. p2
                      ("ddim10": t=0,100,...,900) gives std ~8. Compare with relative errors.
  texts.safetensors   `<name>.<k>`: the float "text" input (stand-in for T5 features)
                      [bsz, max_length, caption_channels] of that run, drawn with
                      torch.Generator().manual_seed(text_seed) (text_seed in runs.json).
  runs.json           list of runs: config, index, weights ("model_ema" | "model"), seed, bsz, num_iter,
                      cfg, cfg_schedule, temperature, height, width, texts (key in texts.safetensors or
                      null), text_seed; plus "configs" (constructor kwargs), "intermediate" notes,
                      "counts" notes and "failures" (configurations the published code cannot run).
  intermediate.safetensors  for config "p1", "model_ema" weights (see runs.json "intermediate"):
                      texts -> text_emb(texts) ; tokens, mask -> forward_fluid_encoder,
                      forward_fluid_decoder, forward_fluid_text_decoder outputs, at the base 16x16 grid,
                      at a non-square 8x12 grid and with an all-masked (empty-encoder) mask; plus the
                      interpolated encoder position embeddings for 8x8, 8x12 and 12x8 grids.
  pub_counts.json     {"p1,bsz1,iter8,cfg3.0": {"total": N, "syncs": S}}: engine.core.counting.count_ops
                      around one published sample_tokens(bsz=1, num_iter=8, cfg=3.0,
                      cfg_schedule="linear", texts=<[1,6,24] tensor>, temperature=1.0, height=256,
                      width=256) with "model_ema" weights, seed 0.
  bench_config.json   constructor kwargs + sampling call of the "Fluid-shaped" CPU benchmark (--bench).
                      --bench also prints wall / process-CPU time of that sample_tokens call and the part
                      spent in diffloss.sample (BENCH_REPEATS=n repeats it).

What main_fluid.py passes to the FLUID presets (fluid_base/large/huge, which fix the widths, depths,
heads, mlp_ratio=4 and norm_layer=partial(nn.LayerNorm, eps=1e-6)): img_size, vae_stride, patch_size,
vae_embed_dim, mask_ratio_min, text_drop_prob, attn_dropout, proj_dropout, diffloss_d, diffloss_w,
num_sampling_steps, diffusion_batch_mul, grad_checkpointing, max_length (args.model names the preset;
its argparse default "mar_large" is not a FLUID preset). Only defaults, never passed by main_fluid.py
or scripts/sample.py: caption_channels=4096, text_depth=6, interpolate_offset=0.1 (and the preset-fixed
encoder/decoder/cross widths, depths and heads). The args recorded here carry all of them.

Published-code constraints seen when building configurations (see runs.json "failures"):
  * DiffLoss is built with z_channels=decoder_embed_dim but consumes the cross-block output
    (cross_embed_dim wide): cross_embed_dim must equal decoder_embed_dim.
  * The text aligner outputs encoder_embed_dim; the cross blocks' kv Linear expects cross_embed_dim:
    with texts given, encoder_embed_dim must equal cross_embed_dim. With texts=None only the fake latent
    (cross width) is attended to, so encoder != decoder == cross samples unconditionally (config "uneq").
  * With texts given and cfg != 1, texts must have exactly max_length tokens (the null branch is
    fake_latent expanded to max_length and concatenated along the batch).
"""
import argparse
import functools
import json
import math
import os
import sys
import time
import types
import importlib.abc
import importlib.machinery

import numpy as np
import torch
import torch.nn as nn

HERE = os.path.dirname(os.path.abspath(__file__))
LIGHTGEN = os.environ.get("LIGHTGEN", "/tmp/lightgen")


def _install_torchvision_standin():
    try:
        import torchvision  # noqa: F401
        return
    except Exception:
        for k in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
            del sys.modules[k]

    class _Meta(type):
        def __getattr__(cls, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return _Meta(name, (_Dummy,), {})

    class _Dummy(metaclass=_Meta):
        def __init__(self, *a, **k):
            pass

    class _Mod(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return _Meta(name, (_Dummy,), {})

    class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, fullname, path, target=None):
            if fullname == "torchvision" or fullname.startswith("torchvision."):
                return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
            return None

        def create_module(self, spec):
            m = _Mod(spec.name)
            m.__path__ = []
            return m

        def exec_module(self, module):
            pass

    sys.meta_path.insert(0, _Finder())


torch.set_num_threads(2)
torch.Tensor.cuda = lambda self, *a, **k: self
nn.Module.cuda = lambda self, *a, **k: self
_install_torchvision_standin()
sys.path.insert(0, LIGHTGEN)
from models.fluid_arbitrary import FLUID  # noqa: E402  (published code)

NORM = functools.partial(nn.LayerNorm, eps=1e-6)

CONFIGS = {
    # stride 16, patch 1: 16x16 base grid; equal widths (required for text conditioning, see docstring)
    "p1": dict(img_size=256, vae_stride=16, patch_size=1, vae_embed_dim=4, text_depth=1,
               encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=2,
               decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=4,
               cross_embed_dim=32, cross_depth=1, cross_num_heads=2,
               mlp_ratio=4.0, caption_channels=24, max_length=6, interpolate_offset=0.1,
               mask_ratio_min=0.7, text_drop_prob=0.1, attn_dropout=0.1, proj_dropout=0.1,
               diffloss_d=1, diffloss_w=32, num_sampling_steps="10", diffusion_batch_mul=4,
               grad_checkpointing=False),
    # stride 8, patch 2 (token dim 16): still a 16x16 base grid at 256x256
    "p2": dict(img_size=256, vae_stride=8, patch_size=2, vae_embed_dim=4, text_depth=1,
               encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=4,
               decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2,
               cross_embed_dim=32, cross_depth=1, cross_num_heads=4,
               mlp_ratio=4.0, caption_channels=20, max_length=8, interpolate_offset=0.1,
               mask_ratio_min=0.7, text_drop_prob=0.1, attn_dropout=0.1, proj_dropout=0.1,
               diffloss_d=2, diffloss_w=24, num_sampling_steps="ddim10", diffusion_batch_mul=4,
               grad_checkpointing=False),
    # stride 8, patch 2, encoder width 24 != decoder width = cross width 32: unconditional only
    "uneq": dict(img_size=256, vae_stride=8, patch_size=2, vae_embed_dim=4, text_depth=1,
                 encoder_embed_dim=24, encoder_depth=1, encoder_num_heads=2,
                 decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4,
                 cross_embed_dim=32, cross_depth=1, cross_num_heads=2,
                 mlp_ratio=4.0, caption_channels=16, max_length=7, interpolate_offset=0.1,
                 mask_ratio_min=0.7, text_drop_prob=0.1, attn_dropout=0.1, proj_dropout=0.1,
                 diffloss_d=1, diffloss_w=32, num_sampling_steps="8", diffusion_batch_mul=4,
                 grad_checkpointing=False),
}

E, R = "model_ema", "model"
T_RUNS = [  # (weights, bsz, num_iter, cfg, cfg_schedule, temperature, height, width, with_texts)
    (E, 2, 4, 1.0, "linear", 1.0, 256, 256, True),     # base grid, no guidance
    (E, 1, 5, 3.0, "linear", 1.0, 256, 256, True),     # base grid, linear cfg
    (E, 3, 3, 2.0, "constant", 1.2, 256, 256, False),  # unconditional with cfg != 1
    (E, 2, 6, 3.0, "constant", 0.8, 128, 128, True),   # 8x8 grid: interpolated positions
    (E, 2, 4, 1.0, "linear", 1.0, 128, 192, False),    # 8x12 grid, unconditional
    (R, 1, 8, 3.0, "linear", 1.0, 192, 128, True),     # 12x8 grid, raw weights
    (R, 2, 3, 4.0, "constant", 1.0, 128, 192, True),   # 8x12 grid, raw weights
]
U_RUNS = [
    (E, 2, 4, 1.0, "linear", 1.0, 256, 256, False),
    (E, 2, 5, 3.0, "linear", 0.8, 128, 192, False),
    (R, 1, 3, 2.0, "constant", 1.0, 128, 128, False),
]
RUNS = {"p1": T_RUNS, "p2": T_RUNS, "uneq": U_RUNS}


def build(cfg):
    return FLUID(norm_layer=NORM, **cfg)


def make_checkpoint(name, cfg):
    torch.manual_seed(0)
    m = build(cfg)
    with torch.no_grad():
        torch.manual_seed(1)
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
        raw = {k: v.clone() for k, v in m.state_dict().items()}
        torch.manual_seed(2)
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
        ema = {k: v.clone() for k, v in m.state_dict().items()}
    args = argparse.Namespace(model="custom", **cfg)
    path = os.path.join(HERE, f"ck_{name}.pth")
    torch.save({"model": raw, "model_ema": ema, "epoch": 0, "args": args}, path)
    return path


def load(path, weights):
    ck = torch.load(path, map_location="cpu", weights_only=False)
    kw = {k: v for k, v in vars(ck["args"]).items() if k != "model"}
    m = build(kw)
    m.load_state_dict(ck[weights])
    return m.eval()


def main():
    from safetensors.torch import save_file
    tokens, texts, runs, failures = {}, {}, [], []
    ckpts = {name: make_checkpoint(name, cfg) for name, cfg in CONFIGS.items()}
    for ci, (name, cfg) in enumerate(CONFIGS.items()):
        for k, (w, bsz, it, cfg_s, sched, temp, h, wd, with_t) in enumerate(RUNS[name]):
            seed = 100 * (ci + 1) + k
            text_seed = 10000 + seed
            t = None
            if with_t:
                g = torch.Generator().manual_seed(text_seed)
                t = torch.randn(bsz, cfg["max_length"], cfg["caption_channels"], generator=g)
                texts[f"{name}.{k}"] = t
            m = load(ckpts[name], w)
            torch.manual_seed(seed)
            np.random.seed(seed)
            with torch.no_grad():
                out = m.sample_tokens(bsz, num_iter=it, cfg=cfg_s, cfg_schedule=sched, texts=t,
                                      temperature=temp, height=h, width=wd)
            tokens[f"{name}.{k}"] = out.contiguous()
            runs.append(dict(config=name, index=k, weights=w, seed=seed, bsz=bsz, num_iter=it, cfg=cfg_s,
                             cfg_schedule=sched, temperature=temp, height=h, width=wd,
                             texts=f"{name}.{k}" if with_t else None, text_seed=text_seed if with_t else None,
                             shape=list(out.shape)))
            print(name, k, tuple(out.shape), float(out.abs().mean()), flush=True)

    # configurations the published code cannot run (recorded, not saved as goldens)
    def try_run(desc, cfg, use_texts):
        torch.manual_seed(0)
        m = build(cfg).eval()
        t = torch.randn(1, cfg["max_length"], cfg["caption_channels"]) if use_texts else None
        try:
            with torch.no_grad():
                m.sample_tokens(1, num_iter=2, cfg=1.0, texts=t, height=256, width=256)
            failures.append(dict(case=desc, config=cfg, error=None))
        except Exception as e:  # noqa: BLE001
            failures.append(dict(case=desc, config=cfg, error=f"{type(e).__name__}: {e}"))
    try_run("decoder width != cross width (diffloss z_channels=decoder_embed_dim)",
            dict(CONFIGS["p1"], decoder_embed_dim=48, decoder_num_heads=4), False)
    try_run("encoder width != cross width, texts given (text aligner output width != cross kv input)",
            CONFIGS["uneq"], True)
    try_run("encoder width == cross width != decoder width, texts given",
            dict(CONFIGS["p1"], decoder_embed_dim=48, decoder_num_heads=4), True)

    # intermediates, config p1, EMA weights
    m = load(ckpts["p1"], E)
    g = torch.Generator().manual_seed(7)
    inter = {}
    inter["texts"] = torch.randn(2, 6, 24, generator=g)
    notes = {"config": "p1", "weights": E, "text_emb": "text_emb(texts) -> text_emb [2,6,32]"}
    with torch.no_grad():
        temb = m.text_emb(inter["texts"])
        inter["text_emb"] = temb
        for tag, (sh, sw, n_unknown) in {"base": (16, 16, 180), "ns": (8, 12, 60), "full": (16, 16, 256)}.items():
            L = sh * sw
            tok = torch.randn(2, L, 4, generator=g)
            mask = torch.zeros(2, L)
            for b in range(2):
                mask[b, torch.randperm(L, generator=g)[:n_unknown]] = 1.0
            m.seq_h, m.seq_w, m.seq_len = sh, sw, L
            enc = m.forward_fluid_encoder(tok, mask)
            dec = m.forward_fluid_decoder(enc, mask)
            z = m.forward_fluid_text_decoder(dec, temb)
            inter.update({f"{tag}.tokens": tok, f"{tag}.mask": mask, f"{tag}.encoder": enc,
                          f"{tag}.decoder": dec, f"{tag}.z": z})
            notes[tag] = (f"m.seq_h, m.seq_w, m.seq_len = {sh}, {sw}, {L}; mask [2,{L}] 1=unknown with "
                          f"{n_unknown} unknown per row; {tag}.encoder = forward_fluid_encoder(tokens, mask) "
                          f"{list(enc.shape)}; {tag}.decoder = forward_fluid_decoder(encoder, mask); "
                          f"{tag}.z = forward_fluid_text_decoder(decoder, text_emb) {list(z.shape)}")
        for sh, sw in [(8, 8), (8, 12), (12, 8)]:
            m.seq_h, m.seq_w, m.seq_len = sh, sw, sh * sw
            x = torch.zeros(1, sh * sw, 32)
            inter[f"pos.encoder.{sh}x{sw}"] = m.interpolate_pos_encoding(x, m.encoder_pos_embed_learned)
        notes["pos"] = ("pos.encoder.HxW = interpolate_pos_encoding(zeros[1,H*W,32], encoder_pos_embed_learned) "
                        "with m.seq_h=H, m.seq_w=W (bicubic, scale_factor=((W+0.1)/16, (H+0.1)/16))")
    save_file({k: v.contiguous() for k, v in inter.items()}, os.path.join(HERE, "intermediate.safetensors"))

    # operation counts
    sys.path.insert(0, os.path.abspath(os.path.join(HERE, "..", "..", "..")))
    from engine.core.counting import count_ops
    m = load(ckpts["p1"], E)
    t = torch.randn(1, 6, 24, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(0)
    np.random.seed(0)
    with torch.no_grad():
        _, c = count_ops(m.sample_tokens, 1, num_iter=8, cfg=3.0, cfg_schedule="linear", texts=t,
                         temperature=1.0, height=256, width=256)
    counts = {"p1,bsz1,iter8,cfg3.0": {"total": c.total, "syncs": c.host_syncs}}
    json.dump(counts, open(os.path.join(HERE, "pub_counts.json"), "w"))

    save_file(tokens, os.path.join(HERE, "tokens.safetensors"))
    save_file({k: v.contiguous() for k, v in texts.items()}, os.path.join(HERE, "texts.safetensors"))
    json.dump(dict(
        configs=CONFIGS, norm_layer="functools.partial(nn.LayerNorm, eps=1e-6)", runs=runs,
        intermediate=notes,
        counts=("pub_counts.json: count_ops(m.sample_tokens, 1, num_iter=8, cfg=3.0, cfg_schedule='linear', "
                "texts=torch.randn(1,6,24, generator=Generator().manual_seed(5)), temperature=1.0, height=256, "
                "width=256), config p1, model_ema, torch.manual_seed(0); np.random.seed(0)"),
        failures=failures), open(os.path.join(HERE, "runs.json"), "w"), indent=1)
    print("counts", counts)
    print("failures", json.dumps(failures, indent=1))


BENCH = dict(img_size=256, vae_stride=16, patch_size=1, vae_embed_dim=16, text_depth=2,
             encoder_embed_dim=384, encoder_depth=6, encoder_num_heads=6,
             decoder_embed_dim=384, decoder_depth=6, decoder_num_heads=6,
             cross_embed_dim=384, cross_depth=6, cross_num_heads=6,
             mlp_ratio=4.0, caption_channels=512, max_length=32, interpolate_offset=0.1,
             mask_ratio_min=0.7, text_drop_prob=0.1, attn_dropout=0.1, proj_dropout=0.1,
             diffloss_d=6, diffloss_w=1024, num_sampling_steps="100", diffusion_batch_mul=4,
             grad_checkpointing=False)
BENCH_CALL = dict(bsz=1, num_iter=16, cfg=4.0, cfg_schedule="constant", temperature=1.0, height=256, width=256)


def bench(repeats=1):
    json.dump(dict(constructor=BENCH, norm_layer="functools.partial(nn.LayerNorm, eps=1e-6)",
                   init="torch.manual_seed(0); FLUID(...); torch.manual_seed(1); p += 0.05*randn_like(p)",
                   sample_tokens=BENCH_CALL, texts="torch.randn(1, 32, 512, generator=Generator().manual_seed(3))",
                   seed="torch.manual_seed(0); np.random.seed(0)", threads=2),
              open(os.path.join(HERE, "bench_config.json"), "w"), indent=1)
    torch.manual_seed(0)
    m = build(BENCH)
    with torch.no_grad():
        torch.manual_seed(1)
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    m.eval()
    print("params (M):", sum(p.numel() for p in m.parameters()) / 1e6,
          "diffloss (M):", sum(p.numel() for p in m.diffloss.parameters()) / 1e6)
    t = torch.randn(1, 32, 512, generator=torch.Generator().manual_seed(3))
    dl_time = [0.0]
    orig = m.diffloss.sample

    def timed(*a, **k):
        t0 = time.perf_counter()
        r = orig(*a, **k)
        dl_time[0] += time.perf_counter() - t0
        return r
    m.diffloss.sample = timed
    for r in range(repeats):
        dl_time[0] = 0.0
        torch.manual_seed(0)
        np.random.seed(0)
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.no_grad():
            out = m.sample_tokens(texts=t, **BENCH_CALL)
        tot, cpu = time.perf_counter() - t0, time.process_time() - c0
        print(f"run {r}: wall {tot:.2f}s (process CPU {cpu:.2f}s), diffloss.sample {dl_time[0]:.2f}s, "
              f"transformer+rest {tot - dl_time[0]:.2f}s, out {tuple(out.shape)}, "
              f"loadavg {os.getloadavg()}", flush=True)


if __name__ == "__main__":
    if "--bench" in sys.argv:
        bench(int(os.environ.get("BENCH_REPEATS", "1")))
    else:
        main()
