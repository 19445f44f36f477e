"""Speculative sampling's acceptance rule (Leviathan et al. 2023; Speculative Jacobi Decoding,
Teng et al. 2024, arXiv 2410.01699), as plain tensor math with no host synchronisation.

A draft token x at a position was drawn from a known distribution q; the model gives that
position the distribution p (given the tokens before it). The draft is accepted with
probability min(1, p(x) / q(x)); the first rejected one is redrawn from
normalize(max(0, p - q)). Whatever q is, the result is distributed exactly as p: accepted with
q(x) min(1, p(x)/q(x)) = min(q(x), p(x)), and redrawn with (1 - sum min(p, q)) * residual(x) =
p(x) - min(p(x), q(x)). Positions after the first rejection saw a wrong token and are redrafted.

Tokens here have `T` sub-tokens per position drawn independently given the position's
prefix (ELM's sub-tokens, one categorical each): each sub-token is verified on its own, which
keeps each one's distribution exact; the position is accepted when all its sub-tokens are.
"""
from __future__ import annotations

import torch


def verify(p: torch.Tensor, q: torch.Tensor, draft: torch.Tensor, fixed: torch.Tensor, u: torch.Tensor,
           race: torch.Tensor):
    """One verification of a window of W positions for B images.

    p, q   [B, W, T, V] target probabilities and the draft distributions
    draft  [B, W, T] drafted tokens (int64), drawn from q
    fixed  [B, W] bool: positions already final (kept, counted as accepted)
    u      [B, W, T] uniforms in [0, 1): the acceptance draws
    race   [B, W, T, V] Exp(1) noise: argmax(w / race) draws from w (the exponential race)

    Returns (tokens [B, W, T], first [B]): `first` is each image's first position not accepted
    (W when all were); tokens at positions <= first are final (accepted drafts, or at `first` the
    accepted sub-tokens and the rejected ones redrawn from the residual); tokens after `first`
    are not (the caller redrafts them)."""
    width = p.shape[1]
    pd = p.gather(-1, draft.unsqueeze(-1)).squeeze(-1)
    qd = q.gather(-1, draft.unsqueeze(-1)).squeeze(-1)
    ok = (u * qd < pd) | fixed.unsqueeze(-1)
    position_ok = ok.all(-1)
    index = torch.arange(width, device=p.device).expand_as(position_ok)
    first = torch.where(position_ok, torch.full_like(index, width), index).min(dim=1).values
    residual = (p - q).clamp_min(0)
    mass = residual.sum(-1, keepdim=True)
    residual = torch.where(mass > 0, residual / mass.clamp_min(torch.finfo(p.dtype).tiny), p)
    redrawn = torch.argmax(residual / race, dim=-1)
    return torch.where(ok, draft, redrawn), first
