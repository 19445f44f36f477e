"""MAR (class-conditional, random-order masked AR over continuous tokens): the published
`models/mar.py` `MAR`. Its modules live in engine/models/mar.py, its configuration in
engine/config.py."""
from __future__ import annotations

import re

import torch

from . import Family


def shape_of(state: dict, key: str):
    t = state.get(key)
    return tuple(t.shape) if isinstance(t, torch.Tensor) else None


def depth_of(state: dict, prefix: str) -> int:
    """Number of blocks `prefix.{i}.` in a state dict (0 when none)."""
    pattern = re.compile(rf"{re.escape(prefix)}\.(\d+)\.")
    found = {int(m.group(1)) for k in state if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def infer_sizes(state: dict) -> dict:
    """Configuration fields that the tensor shapes determine (head counts are not among them)."""
    out = {}
    shape = lambda key: shape_of(state, key)  # noqa: E731
    if shape("class_emb.weight"):
        out["class_num"], out["encoder_embed_dim"] = shape("class_emb.weight")
    if shape("mask_token"):
        out["decoder_embed_dim"] = shape("mask_token")[-1]
    if shape("encoder_pos_embed_learned") and shape("diffusion_pos_embed_learned"):
        out["buffer_size"] = shape("encoder_pos_embed_learned")[1] - shape("diffusion_pos_embed_learned")[1]
    out["encoder_depth"] = depth_of(state, "encoder_blocks")
    out["decoder_depth"] = depth_of(state, "decoder_blocks")
    out["diffloss_d"] = depth_of(state, "diffloss.net.res_blocks")
    out.update(head_and_mlp_sizes(state, out.get("encoder_embed_dim")))
    return out


def head_and_mlp_sizes(state: dict, encoder_width: int | None) -> dict:
    """The diffusion head's width and the blocks' MLP ratio, shared by the MAR-style families."""
    out = {}
    if shape_of(state, "diffloss.net.input_proj.weight"):
        out["diffloss_w"] = shape_of(state, "diffloss.net.input_proj.weight")[0]
    fc1 = shape_of(state, "encoder_blocks.0.mlp.fc1.weight")
    if fc1 and encoder_width:
        out["mlp_ratio"] = fc1[0] / encoder_width
    return out


def _family() -> Family:
    from ..core.config import PRESETS, MARConfig
    from ..model import MARModel
    from ..models.mar import MAR

    return Family(name="mar", config_cls=MARConfig, presets=PRESETS, module_cls=MAR,
                  model_cls=MARModel, marker_keys=("class_emb.weight", "diffusion_pos_embed_learned"),
                  infer_sizes=infer_sizes, head_fields=("encoder_num_heads", "decoder_num_heads"))


FAMILY = _family()
