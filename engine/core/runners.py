"""CUDA-graph capture and replay of a family's steps: one runner, `CapturedSteps`.

A step is a function of static buffers with fixed shapes and no host synchronisation.
`CapturedSteps` warms every step up on a side stream, captures each once as its own graph (all
in one memory pool) and replays it; with `capture=False` the same steps run eagerly over the
same buffers (CPU tests of the bookkeeping). Noise is drawn outside the graphs with the
caller's generator(s), so graphed and eager runs draw the same numbers.

Two step sets feed it:
  PlanSteps    the masked families' plan (engine/core/loop.py run_step): a plan fixes every
               step's shapes, so each step is its own graph (the encoder's length changes from
               step to step); per call the orders, the step context (condition rows,
               per-resolution tables), per-image cfg scales and temperatures and each step's
               noise are copied into the buffers.
  DecodeStep   a causal family's decode position (static KV cache, the position a tensor): the
               same shapes at every position, so one graph replayed for every position (the
               gpt-fast pattern)."""
from __future__ import annotations

import functools
import threading

import torch

from .loop import LazyCache, run_step


def capture_graphs(steps) -> list:
    """Warm every step up on a side stream (Triton compiles, cuBLAS workspaces), then capture
    each as its own CUDA graph, all in one memory pool: [(graph, what the step returned)]. The
    returned tensors live in the pool: each replay rewrites them."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for step in steps:
            step()
    torch.cuda.current_stream().wait_stream(side)
    pool = torch.cuda.graph_pool_handle()
    captured = []
    for step in steps:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            outputs = step()
        captured.append((graph, outputs))
    return captured


class CapturedSteps:
    """The one CUDA-graph runner: `steps` (callables over static buffers) captured together on
    `capture_all()` (or on the first `run`) and replayed by index; eager with capture=False."""

    def __init__(self, steps, capture: bool = True):
        self.steps, self.capture = list(steps), capture
        self.graphs: list | None = None
        self.outputs: list | None = None   # what each step returned (rewritten by each replay)
        self.replays = 0                   # host-side bookkeeping, checked by the CPU tests

    def capture_all(self) -> None:
        if self.capture and self.graphs is None:
            captured = capture_graphs(self.steps)
            self.graphs = [graph for graph, _ in captured]
            self.outputs = [outputs for _, outputs in captured]

    def run(self, k: int = 0):
        if not self.capture:
            return self.steps[k]()
        self.capture_all()
        self.graphs[k].replay()
        self.replays += 1
        return self.outputs[k]


class PlanSteps:
    """A masked plan's steps over static buffers (see the module docstring), run by CapturedSteps."""

    def __init__(self, model, plan, grid, capture: bool = True):
        self.model, self.plan, self.grid = model, plan, grid
        self.capture = capture
        dim, device = model.config.token_dim, model.device
        rows_mult = 2 if plan.use_cfg else 1
        self.tokens = torch.zeros(plan.bsz, plan.seq_len, dim, device=device)
        self.orders = torch.zeros(plan.bsz, plan.seq_len, dtype=torch.long, device=device)
        self.cfg_table = torch.ones(len(plan.steps), plan.bsz, device=device)
        self.temperatures = torch.ones(plan.bsz, device=device)
        self.context: tuple | None = None   # static copies, shaped by the first call's context
        self.x = [torch.zeros(plan.bsz * s.num_predict, dim, device=device) for s in plan.steps]
        self.noise = [torch.zeros(model.head_for(s.head_steps).num_steps, plan.bsz * s.num_predict * rows_mult, dim,
                                  device=device) for s in plan.steps]
        self.lazy = LazyCache.of(model, plan)   # fast "lazy": the guidance-difference buffer
        self.lock = threading.Lock()   # threads sharing the model take turns on these buffers
        self.runner = CapturedSteps([functools.partial(self._step, k) for k in range(len(plan.steps))], capture)

    @property
    def graphs(self) -> list | None:
        return self.runner.graphs

    @property
    def replays(self) -> int:
        return self.runner.replays

    def _step(self, k: int) -> None:
        run_step(self.model, self.plan, self.plan.steps[k], self.tokens, self.orders, self.context,
                 self.cfg_table[k], self.temperatures, self.x[k], self.noise[k], self.lazy)

    def start(self, orders, context, cfg_table, temperatures) -> torch.Tensor:
        if self.context is None:
            self.context = tuple(torch.empty_like(t) for t in context)
        shapes = [tuple(t.shape) for t in context]
        if shapes != [tuple(t.shape) for t in self.context]:
            raise RuntimeError(f"step context shapes changed between calls of one plan: {shapes}")
        for static, value in zip(self.context, context):
            static.copy_(value)
        self.orders.copy_(orders)
        self.cfg_table.copy_(cfg_table)
        self.temperatures.copy_(temperatures)
        self.runner.capture_all()   # before zeroing: the warm-up runs every step on these buffers
        self.tokens.zero_()
        return self.tokens

    def run(self, k: int, x: torch.Tensor, noise: torch.Tensor) -> None:
        self.x[k].copy_(x)
        self.noise[k].copy_(noise)
        self.runner.run(k)

    def finish(self) -> torch.Tensor:
        return self.tokens.clone()


def graphed_runner(model, plan, grid) -> PlanSteps:
    """The runner of `plan`'s shapes on `grid`, captured on first use and cached on the model.
    Per-image settings are buffers, so plans that differ only in cfg / temperature share it."""
    cache = model.__dict__.setdefault("_graph_cache", {})
    key = (plan.shape_key, tuple(grid))
    if key not in cache:
        cache[key] = PlanSteps(model, plan, grid, capture=model.device.type == "cuda")
    return cache[key]   # its plan has the same shapes; cfg scales arrive in the cfg_table buffer


class DecodeStep:
    """One decode step of a causal family, `model.decode_step(prev, input_pos, cache, scale,
    temperature, top_k, top_p, noise, want_logits)` -> (indices, filtered logits, ok), over
    static buffers: captured on the first run, replayed for every later position and call of
    the same shapes. Per call `start` copies the temperatures; per position `run` copies the
    tokens fed back, the position, that step's cfg scale and its noise (drawn outside the
    graph with the caller's generators), then replays. Outputs are the graph's own tensors
    (rewritten by the next replay: callers clone what they keep)."""

    def __init__(self, model, cache, bsz: int, scale, temperature, top_k, top_p, want_logits: bool,
                 capture: bool = True):
        c, device = model.config, model.device
        self.model, self.cache, self.capture = model, cache, capture
        self.settings = (top_k, top_p, want_logits)
        self.prev = torch.zeros(bsz, c.token_each, dtype=torch.long, device=device)
        self.input_pos = torch.zeros(1, dtype=torch.long, device=device)
        self.scale = None if scale is None else torch.ones_like(scale, device=device)
        # A number becomes a 0-d buffer: one graph serves every temperature (on CUDA, x / t and
        # x * reciprocal(t) round alike: engine.ops.categorical.divide_by_temperature).
        shape = temperature.shape if isinstance(temperature, torch.Tensor) else ()
        self.temperature = torch.ones(shape, dtype=torch.float32, device=device)
        self.noise = torch.ones(bsz, c.token_each, c.vocab_size, device=device)
        # Captured on the first run: the warm-up runs this very step, so its cache write is the right one.
        self.runner = CapturedSteps([self._step], capture)

    @property
    def graph(self):
        return None if self.runner.graphs is None else self.runner.graphs[0]

    @property
    def replays(self) -> int:
        return self.runner.replays

    def _step(self):
        top_k, top_p, want_logits = self.settings
        return self.model.decode_step(self.prev, self.input_pos, self.cache, self.scale, self.temperature,
                                      top_k, top_p, self.noise, want_logits=want_logits)

    def start(self, temperature) -> None:
        if isinstance(temperature, torch.Tensor):
            self.temperature.copy_(temperature)
        else:
            self.temperature.fill_(float(temperature))

    def run(self, prev, input_pos, scale, noise):
        self.prev.copy_(prev)
        self.input_pos.copy_(input_pos)
        if self.scale is not None:
            self.scale.copy_(scale)
        self.noise.copy_(noise)
        return self.runner.run(0)


def decode_graph_runner(model, cache, bsz: int, scale, temperature, top_k, top_p, want_logits: bool):
    """The decode runner of these shapes and settings on `cache`, cached on the model (which
    drops them with the cache they were captured on). Captures on CUDA only."""
    runners = model.__dict__.setdefault("_graph_cache", {})
    key = (cache.key, bsz, None if scale is None else tuple(scale.shape),
           tuple(temperature.shape) if isinstance(temperature, torch.Tensor) else (),
           top_k, top_p, want_logits, getattr(model, "backend_name", None))
    if key not in runners:
        runners[key] = DecodeStep(model, cache, bsz, scale, temperature, top_k, top_p, want_logits,
                                         capture=model.device.type == "cuda")
    return runners[key]
