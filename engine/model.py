"""`Model`: a loaded masked-AR transformer of any continuous family + its packed diffusion head +
a head backend; `MARModel`: the class-conditional MAR family's published `sample_tokens`."""
from __future__ import annotations

import torch

from .backends import get_backend
from .core.conditioning import Condition
from .core.errors import ConfigError
from .ops.diffusion import make_tables
from .ops.head import PackedHead
from .core.plan import MAX_BATCH, check_count
from .sampler import sample


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Model:
    """What `engine.load` returns; each family's subclass gives `sample_tokens` the published
    signature and results. `mar` is the family's transformer module (MAR, FLUID, ...)."""

    family = "base"

    def __init__(self, mar, backend="auto", num_sampling_steps: str | None = None,
                 cuda_graphs: bool = True, precision: str = "fp32"):
        """`precision` "bf16" (CUDA or CPU) / "fp16" (CUDA): the transformer runs under autocast
        and the head's large weights are read in that type (Triton kernels on CUDA, the native
        loop on CPU), with float32 accumulation and DDPM math. Tokens then differ from the
        published float32 ones at that precision's level; "fp32" (the default) keeps them."""
        self.mar = mar.eval().requires_grad_(False)
        self.cuda_graphs = cuda_graphs
        if precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        self.precision = precision
        self.config = mar.config
        if num_sampling_steps is not None:
            self.config.num_sampling_steps = str(num_sampling_steps)
        self._backend_request = backend
        # Recommended sampling settings recorded with the model (e.g. cfg, num_iter); the CLI uses them.
        self.sampling_defaults: dict = {}
        # Text-to-image models: the encoder engine.generate(prompts=...) uses by default.
        self.text_encoder = None
        self._pack()

    # Binding -------------------------------------------------------------------------------
    def _pack(self) -> None:
        tables = make_tables(self.config.num_sampling_steps)
        clip = self.config.clip_range if self.config.clip_denoised else None
        self.head = PackedHead.from_head(self.mar.diffloss.net, tables, clip)
        if self.precision == "fp16" and self.device.type != "cuda":
            raise ConfigError("precision 'fp16' is for CUDA devices; on CPU use precision='bf16' "
                              "(or 'fp32', which keeps the published tokens)")
        self.backend = get_backend(self._backend_request, self.device, PRECISIONS[self.precision])
        self.backend.prepare(self.head)
        pack = (self.backend.packs_transformer and self.device.type == "cpu"
                and self.precision in ("fp32", "bf16"))
        self.mar.pack_linears(PRECISIONS[self.precision] if pack else None)
        self._graph_cache = {}  # captured plans hold the old weights and backend: drop them

    @property
    def device(self) -> torch.device:
        return self.mar.diffloss.net.input_proj.weight.device

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return None if self.precision == "fp32" else PRECISIONS[self.precision]

    @property
    def backend_name(self) -> str:
        return self.backend.name

    def to(self, device) -> "Model":
        self.mar.to(device)
        self._pack()
        return self

    def set_backend(self, backend) -> "Model":
        self._backend_request = backend
        self._pack()
        return self

    def set_sampling_steps(self, num_sampling_steps: str) -> "Model":
        self.config.num_sampling_steps = str(num_sampling_steps)
        self._pack()
        return self

    def state_dict(self) -> dict:
        return self.mar.state_dict()

    # Sampling ------------------------------------------------------------------------------
    def step_runner(self, plan, grid):
        """How plan steps run: CUDA graphs (captured once per plan shape, replayed after) when on
        CUDA with a graph-safe backend and `cuda_graphs` on; eager otherwise."""
        if self.device.type == "cuda" and self.cuda_graphs and getattr(self.backend, "graph_safe", False):
            from .core.runners import graphed_runner
            return graphed_runner(self, plan, grid)
        from .sampler import EagerRunner
        return EagerRunner(self, plan, grid)

    def sample(self, bsz: int, condition: Condition, grid, **settings) -> torch.Tensor:
        """Unpatchified tokens [B, C, H, W] of the one masked loop (engine.sampler.sample)."""
        return self.mar.unpatchify(sample(self, bsz, condition, grid, **settings), grid)

    def __repr__(self) -> str:
        c = self.config
        return (f"{type(self).__name__}(seq_len={c.seq_len}, token_dim={c.token_dim}, encoder="
                f"{c.encoder_depth}x{c.encoder_embed_dim}, decoder={c.decoder_depth}x"
                f"{c.decoder_embed_dim}, head={c.diffloss_d}x{c.diffloss_w}, steps="
                f"{c.num_sampling_steps!r}, backend={self.backend.name!r}, device={self.device})")


class MARModel(Model):
    """Class-conditional MAR. `sample_tokens` has the published signature and results."""

    family = "mar"

    def sample_tokens(self, bsz: int, num_iter: int = 64, cfg=1.0, cfg_schedule="linear",
                      labels=None, temperature=1.0, progress: bool = False, generator=None):
        """Sample `[bsz, vae_embed_dim, h, w]` tokens (unpatchified latents, or pixels in [-1, 1]
        for pixel-token models).

        Without `generator` it draws from numpy's and torch's global RNGs in the published order,
        so after `torch.manual_seed(s); np.random.seed(s)` it returns the published tokens. With a
        `torch.Generator`, that generator alone drives orders and noise (no global state read);
        with a list of one per image, image i depends on generator i alone. `cfg`,
        `cfg_schedule` and `temperature` may also be given per image. Steps of the published
        schedule that would predict no token (num_iter > seq_len) are skipped."""
        bsz = check_count("bsz", bsz, MAX_BATCH)
        condition = Condition.labels(labels, bsz, self.config.class_num, self.device)
        return self.sample(bsz, condition, self.mar.grid(), num_iter=num_iter, cfg=cfg,
                           cfg_schedule=cfg_schedule, temperature=temperature, progress=progress,
                           generator=generator)
