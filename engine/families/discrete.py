"""What the BAE-token families (elm-ar, elm-mlm, ctf) share: class labels, decoding with ELM's
binary autoencoder, and the shape of their images."""
from __future__ import annotations

import torch

from ..core.fast import FastModes
from ..core.protocol import labels_and_batch
from ..core.errors import SamplingError


class BAETokens(FastModes):
    """Protocol pieces of a class-conditional model whose tokens a BAE decodes (engine.load_bae;
    a model directory may ship its own, `model.bae`). Needs `config.grid`, `config.token_each`,
    `config.code_dim`, `config.num_classes`."""

    conditioning = "class"
    decoder = "bae"
    bae = None

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def check_decoders(self, vae=None, bae=None, text_encoder=None, prompts=None, texts=None,
                       height=None, width=None):
        """The BAE these tokens decode with (the given one, else the model's own)."""
        c = self.config
        if prompts is not None or texts is not None or text_encoder is not None:
            raise SamplingError("this is a class-conditional model: pass labels=[...], not prompts")
        if height is not None or width is not None:
            raise SamplingError(f"this model samples its {c.grid} x {c.grid} token grid; height / width are "
                                "for text-to-image models")
        if vae is not None:
            raise SamplingError("these tokens decode with a binary autoencoder: pass bae=engine.load_bae(path), "
                                "not vae=")
        bae = self.bae if bae is None else bae
        if bae is None or not hasattr(bae, "decode_indices"):
            raise SamplingError("these tokens need a binary autoencoder to become images: pass "
                                "bae=engine.load_bae('binaryae_ema.th'), or use model.sample_tokens for the tokens")
        if bae.bits != c.token_each * c.code_dim:
            raise SamplingError(f"the BAE has {bae.bits} bits per position but the model's tokens carry "
                                f"token_each * code_dim = {c.token_each} * {c.code_dim} = {c.token_each * c.code_dim}")
        return bae

    def decode(self, tokens: torch.Tensor, vae=None, bae=None) -> torch.Tensor:
        """Sub-token indices [N, L, token_each] -> float32 images [N, C, H, W] in [0, 1] (clamped,
        as ELM's sample.py saves them)."""
        bae = self.check_decoders(vae=vae, bae=bae)
        with torch.no_grad():
            images = bae.decode_indices(tokens.to(bae.device))
        return images.float().clamp(0, 1)

    def image_shape(self, height=None, width=None, vae=None, bae=None) -> tuple:
        bae = self.check_decoders(vae=vae, bae=bae, height=height, width=width)
        side = self.config.grid * 2 ** bae.upsamplings
        return (side, side, bae.out_channels)

    def generate_images(self, labels=None, num_images=None, generator=None, progress=False, vae=None,
                        bae=None, prompts=None, texts=None, text_encoder=None, height=None, width=None,
                        **settings) -> torch.Tensor:
        """engine.generate: one image per label (None with num_images: unconditional)."""
        bae = self.check_decoders(vae, bae, text_encoder, prompts, texts, height, width)
        settings = self.resolve_settings(**settings)
        labels, bsz = labels_and_batch(labels, num_images)
        tokens = self.sample_tokens(bsz, labels=labels, generator=generator, progress=progress, **settings)
        return self.decode(tokens, bae=bae)
