"""`Model`: a loaded transformer of a continuous family (MAR, Fluid, causal) + its packed diffusion
head + a head backend, with the family protocol's shared pieces (engine/core/protocol.py)."""
from __future__ import annotations

import torch

from .backends import get_backend
from .core.conditioning import Condition
from .core.protocol import each, labels_and_batch, resolve_settings
from .core.fast import FastModes
from .core.errors import ConfigError, SamplingError
from .ops.diffusion import make_tables
from .ops.head import PackedHead
from .core.plan import MAX_NUM_ITER, check_cfg, check_count, check_schedule
from .core.loop import InFlightImage, advance, check_finite, sample, validate_temperature


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Model(FastModes):
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
        self._heads = {}        # retimed heads of fast "disa", by diffusion step count

    def head_for(self, steps: int | None):
        """The head of a plan step: the model's own (steps None), or its weights with the
        respacing of `steps` uniform steps (DiSA's `create_diffusion(timestep_respacing=str(steps))`)."""
        if steps is None or steps == self.head.num_steps:
            return self.head
        head = self._heads.get(steps)
        if head is None:
            head = self._heads[steps] = self.head.retimed(make_tables(str(steps)))
            self.backend.prepare(head)   # bound now, not inside a traced or captured step
            self.backend.prepare(self.head)
        return head

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
        from .core.loop import EagerRunner
        return EagerRunner(self, plan, grid)

    def sample(self, bsz: int, condition: Condition, grid, **settings) -> torch.Tensor:
        """Unpatchified tokens [B, C, H, W] of the one masked loop (engine.core.loop.sample)."""
        return self.mar.unpatchify(sample(self, bsz, condition, grid, **settings), grid)

    # The family protocol (engine/core/protocol.py) --------------------------------------------
    conditioning = "class"
    DEFAULTS = {"num_iter": 64, "cfg": 1.0, "cfg_schedule": "linear", "temperature": 1.0, "fast": "exact"}

    @property
    def decoder(self) -> str:
        return "pixels" if self.config.tokenizer == "pixels" else "vae"

    @property
    def num_classes(self) -> int:
        return self.config.class_num

    def setting_checks(self) -> dict:
        return {"num_iter": lambda v: check_count("num_iter", v, MAX_NUM_ITER), "cfg": each(check_cfg),
                "cfg_schedule": each(check_schedule), "temperature": each(validate_temperature),
                "fast": self.fast_setting}

    def resolve_settings(self, **given) -> dict:
        return resolve_settings(given, self.DEFAULTS, self.setting_checks(), self.sampling_defaults)

    def decode(self, tokens: torch.Tensor, vae=None, bae=None) -> torch.Tensor:
        """Tokens -> float32 images [N, C, H, W] in [0, 1] (through `vae` for latent tokens)."""
        from .images import tokens_to_images

        if bae is not None:
            raise SamplingError("bae= decodes the binary tokens of ELM-style models; this model's tokens "
                                + ("are pixels" if self.decoder == "pixels" else "decode with vae="))
        return tokens_to_images(self, tokens, vae)

    def image_shape(self, height=None, width=None, vae=None, bae=None) -> tuple:
        c = self.config
        return (c.img_size, c.img_size, c.vae_embed_dim if self.decoder == "pixels" else 3)

    def check_class_call(self, prompts=None, texts=None, text_encoder=None, height=None, width=None, bae=None):
        if prompts is not None or texts is not None or text_encoder is not None:
            raise SamplingError("this is a class-conditional model: pass labels=[...], not prompts")
        if height is not None or width is not None:
            raise SamplingError("this is a class-conditional model: it samples at its img_size "
                                f"({self.config.img_size}); height / width are for text-to-image models")
        if bae is not None:
            raise SamplingError("bae= is for models whose tokens a binary autoencoder decodes (BAE tokens); "
                                "this model decodes with vae= (or needs none for pixels)")

    def generate_images(self, labels=None, num_images=None, generator=None, progress=False, vae=None, bae=None,
                        prompts=None, texts=None, text_encoder=None, height=None, width=None, **settings):
        """engine.generate for a class-conditional model: one image per label."""
        self.check_class_call(prompts, texts, text_encoder, height, width, bae)
        settings = self.resolve_settings(**settings)
        labels, bsz = labels_and_batch(labels, num_images)
        tokens = self.sample_tokens(bsz, labels=labels, progress=progress, generator=generator, **settings)
        return self.decode(tokens, vae)

    def condition_of(self, label=None, texts=None) -> Condition:
        """The Condition of one image in flight (see Batcher.add)."""
        labels = None if label is None else [label]
        return Condition.labels(labels, 1, self.config.class_num, self.device)

    def batcher(self, max_images: int = 32) -> "MaskedBatcher":
        return MaskedBatcher(self)

    def __repr__(self) -> str:
        c = self.config
        return (f"{type(self).__name__}(seq_len={c.seq_len}, token_dim={c.token_dim}, encoder="
                f"{c.encoder_depth}x{c.encoder_embed_dim}, decoder={c.decoder_depth}x"
                f"{c.decoder_embed_dim}, head={c.diffloss_d}x{c.diffloss_w}, steps="
                f"{c.num_sampling_steps!r}, backend={self.backend.name!r}, device={self.device})")


class MaskedBatcher:
    """Iteration-level batching of the masked families (engine.core.loop.advance): images at the
    same step shape share a transformer pass; all predicted rows share one head call."""

    def __init__(self, model):
        self.model = model

    def add(self, label=None, texts=None, settings=None, generator=None) -> InFlightImage:
        s, model = settings, self.model
        condition = model.condition_of(label, texts)
        return InFlightImage(model, condition, model.mar.grid(), s["num_iter"], s["cfg"], s["cfg_schedule"],
                             s["temperature"], generator, model.check_fast(s.get("fast")))

    def step(self, images: list) -> list:
        return advance(self.model, images)

    def release(self, image) -> None:
        pass   # an image holds no shared buffer

    def tokens(self, images: list) -> torch.Tensor:
        tokens = torch.cat([im.tokens for im in images])
        check_finite(tokens)
        return self.model.mar.unpatchify(tokens, images[0].grid)

    def preview(self, images: list) -> torch.Tensor:
        """The tokens unmasked so far; masked positions hold 0 (as the loop starts them)."""
        return self.model.mar.unpatchify(torch.cat([im.tokens for im in images]), images[0].grid)
