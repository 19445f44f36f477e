"""CUDA-graph capture and replay of plan steps.

A plan fixes every step's shapes, so each step is captured once as its own graph (the encoder's
length changes from step to step) over static buffers, all graphs sharing one memory pool.
Per call the runner copies orders, class embeddings and each step's noise into the static
buffers and replays. Noise is drawn outside the graphs with the caller's generator, so graphed
and eager runs draw the same numbers. With `capture=False` the same static-buffer path runs
eagerly (used on CPU to test it)."""
from __future__ import annotations

import torch

from .sampler import run_step


class GraphedRunner:
    def __init__(self, model, plan, temperature: float, capture: bool = True):
        self.model, self.plan, self.temperature = model, plan, temperature
        self.capture = capture
        config, device = model.config, model.device
        rows_mult = 2 if plan.use_cfg else 1
        self.tokens = torch.zeros(plan.bsz, config.seq_len, config.token_dim, device=device)
        self.orders = torch.zeros(plan.bsz, config.seq_len, dtype=torch.long, device=device)
        self.class_emb = torch.zeros(plan.bsz * rows_mult, config.encoder_embed_dim, device=device)
        self.x = [torch.zeros(plan.bsz * s.num_predict, config.token_dim, device=device) for s in plan.steps]
        self.noise = [torch.zeros(model.head.num_steps, plan.bsz * s.num_predict * rows_mult,
                                  config.token_dim, device=device) for s in plan.steps]
        self.graphs: list | None = None

    def _step(self, k: int) -> None:
        run_step(self.model, self.plan, self.plan.steps[k], self.tokens, self.orders, self.class_emb,
                 self.x[k], self.noise[k], self.temperature)

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

    def start(self, orders: torch.Tensor, class_emb: torch.Tensor) -> torch.Tensor:
        self.orders.copy_(orders)
        self.class_emb.copy_(class_emb)
        if self.capture and self.graphs is None:
            self._capture_all()
        self.tokens.zero_()
        return self.tokens

    def run(self, k: int, x: torch.Tensor, noise: torch.Tensor) -> None:
        self.x[k].copy_(x)
        self.noise[k].copy_(noise)
        if self.capture:
            self.graphs[k].replay()
        else:
            self._step(k)

    def finish(self) -> torch.Tensor:
        return self.tokens.clone()


def graphed_runner(model, plan, temperature: float) -> GraphedRunner:
    """The runner of `plan`, captured on first use and cached on the model (keyed by the plan's
    shape parameters and the temperature, which the graphs bake in)."""
    cache = model.__dict__.setdefault("_graph_cache", {})
    key = (plan.bsz, plan.num_iter, plan.cfg, plan.cfg_schedule, temperature)
    if key not in cache:
        cache[key] = GraphedRunner(model, plan, temperature, capture=model.device.type == "cuda")
    return cache[key]
