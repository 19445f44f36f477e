"""Local Hugging Face T5 text encoders (transformers' `T5EncoderModel` and its tokenizer), as
LightGen's `T5_Embedding` uses them: prompts padded (and truncated) to `max_length`,
`last_hidden_state` of the encoder with the attention mask. Nothing is ever downloaded: the
directory must hold the files, and a missing or incomplete one is named in the error."""
from __future__ import annotations

from pathlib import Path

import torch

from .errors import CheckpointError, SamplingError

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "spiece.model")


def check_text_encoder_dir(path: Path) -> None:
    if not path.is_dir():
        raise CheckpointError(f"text encoder directory not found: {path} (a local Hugging Face T5 "
                              "directory with config.json, weights and tokenizer files; nothing is "
                              "downloaded)")
    missing = []
    if not (path / "config.json").exists():
        missing.append("config.json")
    if not any((path / f).exists() for f in WEIGHT_FILES):
        missing.append(" or ".join(WEIGHT_FILES[::2]))
    if not any((path / f).exists() for f in TOKENIZER_FILES):
        missing.append(" or ".join(TOKENIZER_FILES) + " (the tokenizer)")
    if missing:
        raise CheckpointError(f"{path} is not a complete T5 encoder directory: missing {', '.join(missing)}")


class TextEncoder:
    """prompts -> [B, max_length, d_model] float32 text embeddings (LightGen's T5_Embedding)."""

    def __init__(self, encoder, tokenizer, max_length: int, source: str = ""):
        self.encoder, self.tokenizer, self.max_length, self.source = encoder, tokenizer, max_length, source

    @property
    def channels(self) -> int:
        return int(self.encoder.config.d_model)

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    def to(self, device) -> "TextEncoder":
        self.encoder.to(device)
        return self

    def tokenize(self, prompts):
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts \
                or not all(isinstance(p, str) for p in prompts):
            raise SamplingError(f"prompts must be a non-empty list of strings, got {prompts!r:.100}")
        return self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length,
                              truncation=True, return_attention_mask=True, return_tensors="pt")

    @torch.no_grad()
    def __call__(self, prompts) -> torch.Tensor:
        batch = self.tokenize(prompts)
        out = self.encoder(input_ids=batch.input_ids.to(self.device),
                           attention_mask=batch.attention_mask.to(self.device))
        return out["last_hidden_state"].float()

    def __repr__(self) -> str:
        return f"TextEncoder({self.source!r}, d_model={self.channels}, max_length={self.max_length})"


def load_text_encoder(path, max_length: int = 128, device="cpu", dtype=torch.float32) -> TextEncoder:
    """A local T5 encoder directory (e.g. google/flan-t5-xxl saved with save_pretrained).
    max_length: prompts are padded / truncated to it (LightGen's pipeline: 128)."""
    try:
        from transformers import AutoTokenizer, T5EncoderModel
    except ImportError as err:
        raise CheckpointError(f"text encoders need transformers (pip install 'engine[text]'): {err}") from None
    if isinstance(max_length, bool) or not isinstance(max_length, int) or not 1 <= max_length <= 4096:
        raise SamplingError(f"max_length must be an integer in [1, 4096], got {max_length!r}")
    path = Path(path)
    check_text_encoder_dir(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        encoder = T5EncoderModel.from_pretrained(str(path), local_files_only=True, dtype=dtype)
    except Exception as err:  # noqa: BLE001  (safetensors / torch / json errors all mean: unusable)
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CheckpointError(f"{path}: cannot load the T5 encoder or its tokenizer: "
                              f"{type(err).__name__}: {first}") from None
    if tokenizer.pad_token is None:
        raise CheckpointError(f"{path}: the tokenizer has no pad token (needed to pad to max_length)")
    return TextEncoder(encoder.eval().requires_grad_(False).to(device), tokenizer, max_length, str(path))
