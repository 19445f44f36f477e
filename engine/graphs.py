"""CUDA-graph capture and replay of plan steps, for every family.

A plan fixes every step's shapes, so each step is captured once as its own graph (the encoder's
length changes from step to step) over static buffers, all graphs sharing one memory pool.
Per call the runner copies orders, the family's step context (condition rows, per-resolution
tables), the per-image cfg scales and temperatures and each step's noise into the static
buffers and replays. Noise is drawn outside the graphs with the caller's generator(s), so
graphed and eager runs draw the same numbers. With `capture=False` the same static-buffer path
runs eagerly (used on CPU to test the bookkeeping)."""
from __future__ import annotations

import threading

import torch

from .sampler import run_step


class GraphedRunner:
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
        self.noise = [torch.zeros(model.head.num_steps, plan.bsz * s.num_predict * rows_mult, dim,
                                  device=device) for s in plan.steps]
        self.graphs: list | None = None
        self.lock = threading.Lock()   # threads sharing the model take turns on these buffers
        self.replays = 0   # host-side bookkeeping, checked by the CPU tests

    def _step(self, k: int) -> None:
        run_step(self.model, self.plan, self.plan.steps[k], self.tokens, self.orders, self.context,
                 self.cfg_table[k], self.temperatures, self.x[k], self.noise[k])

    def _capture_all(self) -> None:
        # Warm up on a side stream (Triton compiles, cuBLAS workspaces), then capture each step.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for k in range(len(self.plan.steps)):
                self._step(k)
        torch.cuda.current_stream().wait_stream(side)
        pool = torch.cuda.graph_pool_handle()
        graphs = []
        for k in range(len(self.plan.steps)):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._step(k)
            graphs.append(graph)
        self.graphs = graphs

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
        if self.capture and self.graphs is None:
            self._capture_all()
        self.tokens.zero_()
        return self.tokens

    def run(self, k: int, x: torch.Tensor, noise: torch.Tensor) -> None:
        self.x[k].copy_(x)
        self.noise[k].copy_(noise)
        if self.capture:
            self.graphs[k].replay()
            self.replays += 1
        else:
            self._step(k)

    def finish(self) -> torch.Tensor:
        return self.tokens.clone()


def graphed_runner(model, plan, grid) -> GraphedRunner:
    """The runner of `plan`'s shapes on `grid`, captured on first use and cached on the model.
    Per-image settings are buffers, so plans that differ only in cfg / temperature share it."""
    cache = model.__dict__.setdefault("_graph_cache", {})
    key = (plan.shape_key, tuple(grid))
    if key not in cache:
        cache[key] = GraphedRunner(model, plan, grid, capture=model.device.type == "cuda")
    return cache[key]   # its plan has the same shapes; cfg scales arrive in the cfg_table buffer
