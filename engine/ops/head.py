"""The per-token diffusion head (MAR's SimpleMLPAdaLN), state-dict compatible with the published
`diffloss.net.*` keys, and `PackedHead`: its weights packed once for the fast backends."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from .diffusion import DiffusionTables

FREQ_DIM = 256
LN_EPS = 1e-6


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


def timestep_frequencies(t: torch.Tensor, dim: int = FREQ_DIM, max_period: float = 10000.0):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs.to(t.device)[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQ_DIM, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t):
        return self.mlp(timestep_frequencies(t))


class ResBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=LN_EPS)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x, y):
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(modulate(self.in_ln(x), shift, scale))


class FinalLayer(nn.Module):
    def __init__(self, width: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=LN_EPS)
        self.linear = nn.Linear(width, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x, y):
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiffusionHead(nn.Module):
    """eps and variance prediction for one token: `forward(x [N,C], t [N] original steps, c [N,D])`."""

    def __init__(self, token_dim: int, cond_dim: int, width: int, depth: int):
        super().__init__()
        self.in_channels = token_dim
        self.width = width
        self.depth = depth
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(cond_dim, width)
        self.input_proj = nn.Linear(token_dim, width)
        self.res_blocks = nn.ModuleList(ResBlock(width) for _ in range(depth))
        self.final_layer = FinalLayer(width, 2 * token_dim)

    def forward(self, x, t, c):
        h = self.input_proj(x)
        y = self.time_embed(t) + self.cond_embed(c)
        for block in self.res_blocks:
            h = block(h, y)
        return self.final_layer(h, y)

    def forward_with_cfg(self, x, t, c, cfg_scale):
        """Rows are [cond; uncond]; only the first half of x is read (as published)."""
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half], dim=0), t, c)
        eps, rest = out[:, : self.in_channels], out[:, self.in_channels:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)


class DiffLoss(nn.Module):
    """Holder so state-dict keys read `diffloss.net.*` as in the published model."""

    def __init__(self, token_dim: int, cond_dim: int, width: int, depth: int):
        super().__init__()
        self.net = DiffusionHead(token_dim, cond_dim, width, depth)


@dataclass
class PackedHead:
    """Head weights and diffusion tables arranged once for the fast backends.

    `ada_weight` stacks every block's adaLN projection and then the final layer's, so one GEMM
    per diffusion step yields all modulations: rows [3w*k : 3w*(k+1)] are block k's
    (shift, scale, gate), the last 2w rows the final layer's (shift, scale).
    `time_emb[i]` is the time embedding of respaced index i, computed with the head's own ops.
    """

    net: DiffusionHead
    tables: DiffusionTables
    table: torch.Tensor            # [T, 7] float32, see diffusion.TABLE_COLUMNS
    timestep_map: torch.Tensor     # [T] int64
    time_emb: torch.Tensor         # [T, w]
    cond_weight: torch.Tensor      # [w, D]
    cond_bias: torch.Tensor
    in_weight: torch.Tensor        # [w, C]
    in_bias: torch.Tensor
    ln_weight: torch.Tensor        # [depth, w]
    ln_bias: torch.Tensor          # [depth, w]
    fc1_weight: torch.Tensor       # [depth, w, w]
    fc1_bias: torch.Tensor         # [depth, w]
    fc2_weight: torch.Tensor       # [depth, w, w]
    fc2_bias: torch.Tensor         # [depth, w]
    ada_weight: torch.Tensor       # [(3*depth+2)*w, w]
    ada_bias: torch.Tensor
    out_weight: torch.Tensor       # [2C, w]
    out_bias: torch.Tensor
    clip_range: tuple[float, float] | None   # x0 clipped to this range before the posterior mean
    base: "PackedHead | None" = None         # the head whose weights a retimed one shares

    @property
    def weights(self) -> "PackedHead":
        """The head that owns these weights (itself, or the one `retimed` came from)."""
        return self if self.base is None else self.base

    @torch.no_grad()
    def retimed(self, tables: DiffusionTables) -> "PackedHead":
        """The same weights with another respacing's tables (DiSA's per-step schedules): the
        weight tensors are shared, only the time rows and coefficient table are new."""
        device = self.in_weight.device
        timestep_map = torch.from_numpy(tables.timestep_map).to(device)
        fields = {f: getattr(self, f) for f in self.__dataclass_fields__}
        fields.update(tables=tables, table=tables.as_tensor(device), timestep_map=timestep_map,
                      time_emb=self.net.time_embed(timestep_map).contiguous(), base=self.weights)
        return PackedHead(**fields)

    @property
    def token_dim(self) -> int:
        return self.in_weight.shape[1]

    @property
    def width(self) -> int:
        return self.in_weight.shape[0]

    @property
    def depth(self) -> int:
        return self.ln_weight.shape[0]

    @property
    def num_steps(self) -> int:
        return self.table.shape[0]

    @classmethod
    @torch.no_grad()
    def from_head(cls, net: DiffusionHead, tables: DiffusionTables, clip_range=None) -> "PackedHead":
        device = net.input_proj.weight.device
        timestep_map = torch.from_numpy(tables.timestep_map).to(device)
        blocks = list(net.res_blocks)
        fin = net.final_layer

        def stack(get):
            if not blocks:
                return torch.empty(0, device=device)
            return torch.stack([get(b).detach() for b in blocks]).contiguous()

        ada = [b.adaLN_modulation[1] for b in blocks] + [fin.adaLN_modulation[1]]
        return cls(
            net=net, tables=tables, table=tables.as_tensor(device), timestep_map=timestep_map,
            time_emb=net.time_embed(timestep_map).contiguous(),
            cond_weight=net.cond_embed.weight, cond_bias=net.cond_embed.bias,
            in_weight=net.input_proj.weight, in_bias=net.input_proj.bias,
            ln_weight=stack(lambda b: b.in_ln.weight), ln_bias=stack(lambda b: b.in_ln.bias),
            fc1_weight=stack(lambda b: b.mlp[0].weight), fc1_bias=stack(lambda b: b.mlp[0].bias),
            fc2_weight=stack(lambda b: b.mlp[2].weight), fc2_bias=stack(lambda b: b.mlp[2].bias),
            ada_weight=torch.cat([m.weight for m in ada]).contiguous(),
            ada_bias=torch.cat([m.bias for m in ada]).contiguous(),
            out_weight=fin.linear.weight, out_bias=fin.linear.bias,
            clip_range=None if clip_range is None else (float(clip_range[0]), float(clip_range[1])),
        )


def ddpm_update(x, eps, v, coeffs, noise, temperature, clip_range=None):
    """One reverse step for all rows. `coeffs` is one row of the [T, 7] table.

    Operation order follows the published p_sample so float32 rounding matches."""
    sqrt_recip, sqrt_recipm1, coef1, coef2, min_log, max_log, nonzero = coeffs.unbind(-1)
    x0 = sqrt_recip * x - sqrt_recipm1 * eps
    if clip_range is not None:
        x0 = x0.clamp(clip_range[0], clip_range[1])
    mean = coef1 * x0 + coef2 * x
    frac = (v + 1) / 2
    logvar = frac * max_log + (1 - frac) * min_log
    return mean + nonzero * torch.exp(0.5 * logvar) * noise * temperature


def row_param(value, name: str, n: int, device, optional: bool = False, as_tensor: bool = False):
    """Check one per-row head_loop argument (cfg_scale / temperature) for n result rows.

    Returns None (only when `optional`), a float, or a float32 tensor [n] on `device`; with
    `as_tensor` a number comes back as that tensor too (torch.full: the same float32 rounding).
    A 0-dim tensor counts as a number for every row."""
    if value is None:
        if optional:
            return None
        raise ValueError(f"{name} must be a number or a float32 tensor of shape [{n}], got None")
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            value = value.reshape(1).expand(n)
        if value.dim() != 1 or value.shape[0] != n:
            raise ValueError(f"{name} must be a number or a float32 tensor of shape [{n}] (one per "
                             f"result row), got a tensor of shape {list(value.shape)}")
        return value.to(device=device, dtype=torch.float32).contiguous()
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number or a float32 tensor of shape [{n}], "
                         f"got {type(value).__name__}") from None
    return torch.full((n,), value, dtype=torch.float32, device=device) if as_tensor else value
