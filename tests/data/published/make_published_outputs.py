"""How the files beside this script were made: outputs of the PUBLISHED MAR code for configurations
the golden set does not cover (patch size 2, unequal encoder/decoder widths, buffer 0 and 1, 1000
classes, "ddim10" / "10,5" / "25" respacings). Not run by the tests (it needs the published code).

Run from a checkout of the published MAR repository, in an environment with torch, numpy, scipy,
tqdm and timm (timm's optional torchvision imports may be stubbed); on CPU the published `.cuda()`
calls are made no-ops. Writes ck_<name>.pth (published checkpoint format), runs.json, and
tokens.safetensors (`<name>.<run index>`: tokens after torch.manual_seed(100+k); np.random.seed(100+k)).
"""
import sys, argparse, json, torch, numpy as np
from safetensors.torch import save_file
torch.Tensor.cuda = lambda self, *a, **k: self
sys.path.insert(0, '.')
from functools import partial
import torch.nn as nn
from models.mar import MAR
configs = {
 "p2": dict(img_size=128, vae_stride=16, patch_size=2, vae_embed_dim=4, encoder_embed_dim=48, encoder_depth=2, encoder_num_heads=3, decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=2, buffer_size=3, class_num=7, diffloss_d=2, diffloss_w=40, num_sampling_steps="ddim10"),
 "sec": dict(img_size=64, vae_stride=16, patch_size=1, vae_embed_dim=16, encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=2, decoder_embed_dim=64, decoder_depth=3, decoder_num_heads=4, buffer_size=0, class_num=3, diffloss_d=3, diffloss_w=48, num_sampling_steps="10,5"),
 "buf1": dict(img_size=96, vae_stride=16, patch_size=1, vae_embed_dim=16, encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=4, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4, buffer_size=1, class_num=1000, diffloss_d=1, diffloss_w=32, num_sampling_steps="25"),
}
runs = [dict(bsz=2, num_iter=5, cfg=1.0, cfg_schedule="linear", labels=[1, 2], temperature=1.0),
        dict(bsz=3, num_iter=7, cfg=2.5, cfg_schedule="linear", labels=[0, 2, 1], temperature=0.9),
        dict(bsz=2, num_iter=3, cfg=1.5, cfg_schedule="constant", labels=None, temperature=1.1)]
out = {}
for name, cfg in configs.items():
    torch.manual_seed(0)
    m = MAR(norm_layer=partial(nn.LayerNorm, eps=1e-6), mlp_ratio=4, **cfg).eval()
    with torch.no_grad():
        for p in m.parameters(): p.add_(0.05 * torch.randn_like(p))
    args = argparse.Namespace(model="custom", **cfg)
    torch.save({"model_ema": m.state_dict(), "epoch": 0, "args": args}, f"ck_{name}.pth")
    for k, r in enumerate(runs):
        torch.manual_seed(100 + k); np.random.seed(100 + k)
        labels = None if r["labels"] is None else torch.tensor(r["labels"])
        with torch.no_grad():
            t = m.sample_tokens(r["bsz"], r["num_iter"], r["cfg"], r["cfg_schedule"], labels, r["temperature"])
        out[f"{name}.{k}"] = t
save_file({k: v.contiguous() for k, v in out.items()}, "tokens.safetensors")
json.dump(runs, open("runs.json", "w"))
print("done", {k: tuple(v.shape) for k, v in out.items()})
