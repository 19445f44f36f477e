"""fast="speculative" for the causal discrete families (elm-ar, CTF's first stage): Speculative
Jacobi Decoding (Teng et al. 2024, arXiv 2410.01699) over a static KV cache.

Every image keeps drafts for all its positions: uniform random tokens at first (their q is
uniform), later the model's own draws. An iteration feeds a window of W drafted tokens per
image in one pass (ELMTransformer.decode_window), giving the target distribution p of the
window's W positions; the drafts are verified in order with speculative sampling's rule
(engine.ops.speculative.verify: accept x with probability min(1, p(x)/q(x)), the first
rejected position redrawn from normalize(max(0, p - q))), and the positions after it are
redrafted from their p (the Jacobi update; p becomes their q). Each iteration finalises at
least one position, so an image needs at most L iterations; with good drafts many fewer.

The target p is exactly what the exact sampler draws from: CFG `u + (c - u) * scale` with the
position's scale, `/ temperature`, top-k, top-p, softmax (engine.ops.categorical). The tokens
differ from exact mode's (other random numbers), their distribution does not. Each image
draws its random numbers from its own generator (a list) and runs its own window, so its tokens
do not depend on its batch-mates.

Not graph-captured: the window start moves by data-dependent amounts (eager on every device).
Memory: the drafts' distributions q, [B, W, T, V] float32, besides the KV cache.
"""
from __future__ import annotations

import torch

from ..core.errors import SamplingError
from ..ops.categorical import divide_by_temperature, top_k_mask, top_p_mask
from ..ops.speculative import verify


def _draw(generator, bsz: int, shape: tuple, device, kind: str, high: int = 0) -> torch.Tensor:
    """[bsz, *shape] of uniforms ("rand"), Exp(1) ("exp") or integers below `high` ("int"); a
    generator list draws image b's rows from generator b alone."""
    if isinstance(generator, list):
        return torch.cat([_draw(g, 1, shape, device, kind, high) for g in generator])
    gen_device = generator.device if generator is not None else torch.device(device)
    size = (bsz, *shape)
    if kind == "rand":
        out = torch.rand(size, generator=generator, device=gen_device)
    elif kind == "exp":
        out = torch.empty(size, device=gen_device).exponential_(1, generator=generator)
    else:
        out = torch.randint(high, size, generator=generator, device=gen_device)
    return out.to(device)


def target_probs(logits, index, table, temperature, top_k, top_p):
    """p [B, W, T, V] of the exact sampler for logits [B', W, T, V] (B' = 2B with CFG, `table`
    given: [L] or [L, B] per-step scales) of the tokens `index [B, W]`."""
    if table is not None:
        cond, uncond = logits.chunk(2, dim=0)
        if table.ndim == 1:
            scale = table[index]
        else:
            scale = table[index, torch.arange(index.shape[0], device=index.device)[:, None]]
        logits = uncond + (cond - uncond) * scale[..., None, None]
    logits = divide_by_temperature(logits, temperature)
    if top_k is not None:
        logits = top_k_mask(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = top_p_mask(logits, top_p)
    return torch.softmax(logits, dim=-1)


@torch.no_grad()
def speculative_sample(module, rows, bsz: int, num_iter: int, table, temperature, top_k, top_p,
                       generator, window: int, cache, progress: bool = False):
    """Tokens [B, num_iter, T] of `module` (an ELMTransformer: prefill, decode_window) for class
    rows `rows [B']` ([cond; null] with CFG), and the number of verification passes run."""
    device = rows.device
    T, V, L = module.token_each, module.vocab_size, num_iter
    use_cfg = table is not None
    W = max(1, min(window, L - 1))
    offsets = torch.arange(W, device=device)
    tokens = _draw(generator, bsz, (L, T), device, "int", V)
    q = torch.full((bsz, W, T, V), 1.0 / V, device=device)
    done = torch.zeros(bsz, dtype=torch.int64, device=device)     # final positions per image
    start = torch.zeros(bsz, dtype=torch.int64, device=device)    # token index of q[:, 0]
    finite = torch.ones((), dtype=torch.bool, device=device)

    logits0 = module.prefill(rows, None, cache)                     # token 0's logits [B', T, V]
    passes = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=L, desc="sampling (speculative)", unit="token")
    while True:
        if passes == 0:   # the class position's logits, then tokens 0 .. W-2 at positions 1 .. W-1
            index = offsets.expand(bsz, -1)
            logits = logits0.unsqueeze(1)
            if W > 1:
                feed = tokens[:, :W - 1]
                rest = module.decode_window(torch.cat([feed, feed]) if use_cfg else feed, 1, cache)
                logits = torch.cat([logits, rest], dim=1)
        else:
            index = start[:, None] + offsets                        # tokens start .. start+W-1
            feed = tokens.gather(1, (index - 1).unsqueeze(-1).expand(-1, -1, T))
            positions = torch.cat([start, start]) if use_cfg else start
            logits = module.decode_window(torch.cat([feed, feed]) if use_cfg else feed, positions, cache)
        p = target_probs(logits, index, table, temperature, top_k, top_p)
        finite = finite & torch.isfinite(p).all()
        draft = tokens.gather(1, index.unsqueeze(-1).expand(-1, -1, T))
        u = _draw(generator, bsz, (W, T), device, "rand")
        race = _draw(generator, bsz, (W, T, V), device, "exp")
        verified, first = verify(p, q, draft, index < done[:, None], u, race)
        redraft = torch.argmax(p / race, dim=-1)                    # the Jacobi update, q := p
        final = offsets[None, :] <= first[:, None]
        new = torch.where(final.unsqueeze(-1), verified, redraft)
        tokens.scatter_(1, index.unsqueeze(-1).expand(-1, -1, T), new)
        before = done
        done = torch.minimum(torch.maximum(done, start + torch.clamp(first + 1, max=W)), torch.full_like(done, L))
        passes += 1
        if bar is not None:
            bar.update(int(done.min()) - int(before.min()))
        if bool((done >= L).all()):   # one host sync per pass: the loop's length is data-dependent
            break
        # Next window: from the first unfinished token, kept inside the sequence (start >= 1:
        # position start holds token start-1). q moves with it; positions new to it are uniform.
        nxt = torch.clamp(torch.minimum(done, torch.full_like(done, L - W)), min=1)
        shift = (nxt - start)[:, None] + offsets                    # old window index of new row i
        inside = shift < W
        q = torch.where(inside[..., None, None],
                        p.gather(1, shift.clamp(max=W - 1)[..., None, None].expand(-1, -1, T, V)),
                        torch.full_like(p, 1.0 / V))
        start = nxt
    if bar is not None:
        bar.close()
    if not bool(finite):
        raise SamplingError("sampling produced NaN/Inf probabilities: the logits overflow float32 with "
                            "these weights and settings (temperature, cfg)")
    return tokens, passes
