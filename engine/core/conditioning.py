"""What a sampling call is conditioned on: class labels, text embeddings, or nothing.

A `Condition` is validated at the API boundary; the family turns it into its step context
(e.g. class-embedding rows, or cross-attention keys/values), appending its own null condition
for the unconditional half when CFG doubles the batch."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .errors import SamplingError

KINDS = ("class", "text", "none")


@dataclass(frozen=True)
class Condition:
    kind: str                      # "class", "text" or "none"
    value: torch.Tensor | None     # labels [B] int64, text embeddings [B, L, X] float32, or None

    @classmethod
    def none(cls) -> "Condition":
        return cls("none", None)

    @classmethod
    def labels(cls, labels, bsz: int, class_num: int, device) -> "Condition":
        """Class labels (one per image), or no condition for labels=None."""
        if labels is None:
            return cls.none()
        if isinstance(labels, torch.Tensor):
            if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
                raise SamplingError(f"labels must be integers, got a {labels.dtype} tensor")
            values = labels.detach().to("cpu", torch.int64).reshape(-1)
            shape = tuple(labels.shape)
        else:
            arr = np.asarray(labels)
            if arr.dtype == object or not np.issubdtype(arr.dtype, np.integer):
                raise SamplingError(f"labels must be integers, got {labels!r}")
            values = torch.from_numpy(arr.astype(np.int64)).reshape(-1)
            shape = arr.shape
        if len(shape) != 1 or shape[0] != bsz:
            raise SamplingError(f"expected {bsz} labels (one per image), got shape {shape}")
        bad = values[(values < 0) | (values >= class_num)]
        if bad.numel():
            raise SamplingError(f"label {int(bad[0])} is out of range: this model has {class_num} "
                                f"classes (0..{class_num - 1})")
        return cls("class", values.to(device))

    @classmethod
    def text(cls, texts, bsz: int, max_length: int, channels: int, device) -> "Condition":
        """Text-encoder outputs [B, max_length, channels] (e.g. T5's last_hidden_state padded to
        max_length), or no condition for texts=None."""
        if texts is None:
            return cls.none()
        if not isinstance(texts, torch.Tensor):
            raise SamplingError(f"texts must be a tensor [B, {max_length}, {channels}] of text-encoder "
                                f"outputs, got {type(texts).__name__}; encode prompts with "
                                "engine.load_text_encoder(DIR)")
        want = (bsz, max_length, channels)
        if tuple(texts.shape) != want:
            raise SamplingError(f"texts must have shape {list(want)} (batch, max_length, "
                                f"caption_channels), got {list(texts.shape)}")
        if not texts.is_floating_point():
            raise SamplingError(f"texts must be floating point, got {texts.dtype}")
        if not bool(torch.isfinite(texts).all()):
            raise SamplingError("texts contain NaN or Inf values")
        return cls("text", texts.detach().to(device, torch.float32))
