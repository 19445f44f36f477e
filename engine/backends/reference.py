"""Plain eager PyTorch, operation for operation the published sampler's diffusion loop.

It is the correctness reference and the speed baseline: it keeps the published per-step work
(time embedding, cond_embed, every adaLN projection, numpy-table lookups broadcast to full size)."""
from __future__ import annotations

import torch

from .base import HeadBackend
from ..ops.head import row_param


class ReferenceBackend(HeadBackend):
    name = "reference"

    @torch.no_grad()
    def head_loop(self, head, z, x, noise, cfg_scale, temperature):
        net = head.net
        tables = head.tables
        rows, n = z.shape[0], x.shape[0]
        cfg_scale = row_param(cfg_scale, "cfg_scale", n, z.device, optional=True)
        temperature = row_param(temperature, "temperature", n, z.device)
        img = torch.cat([x, x]) if cfg_scale is not None else x
        # Per-row values as columns: [n, 1] scales the cond/uncond eps of forward_with_cfg, the
        # temperatures repeat for the uncond half (its rows are dropped, as with a number).
        if isinstance(cfg_scale, torch.Tensor):
            cfg_scale = cfg_scale[:, None]
        if isinstance(temperature, torch.Tensor):
            temperature = temperature.repeat(1 if cfg_scale is None else 2)[:, None]
        timestep_map = torch.from_numpy(tables.timestep_map).to(z.device)
        columns = {name: torch.from_numpy(getattr(tables, name)) for name in
                   ("sqrt_recip_ab", "sqrt_recipm1_ab", "coef1", "coef2", "min_log", "max_log")}
        clip = head.clip_range

        def extract(name, t):
            return columns[name].to(z.device)[t].float()[:, None] + torch.zeros(img.shape, device=z.device)

        for k, i in enumerate(reversed(range(tables.num_steps))):
            t = torch.tensor([i] * rows, device=z.device)
            ts = timestep_map[t]
            if cfg_scale is None:
                out = net(img, ts, z)
            else:
                out = net.forward_with_cfg(img, ts, z, cfg_scale)
            eps, v = torch.split(out, img.shape[1], dim=1)
            min_log, max_log = extract("min_log", t), extract("max_log", t)
            frac = (v + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
            x0 = extract("sqrt_recip_ab", t) * img - extract("sqrt_recipm1_ab", t) * eps
            if clip is not None:
                x0 = x0.clamp(clip[0], clip[1])
            mean = extract("coef1", t) * x0 + extract("coef2", t) * img
            nonzero = (t != 0).float().view(-1, 1)
            img = mean + nonzero * torch.exp(0.5 * log_variance) * noise[k] * temperature
        return img[: x.shape[0]]
