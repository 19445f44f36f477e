"""Local Hugging Face T5 text encoders (transformers' `T5EncoderModel` and its tokenizer), as
LightGen's `T5_Embedding` uses them: prompts padded (and truncated) to `max_length`,
`last_hidden_state` of the encoder with the attention mask. Nothing is ever downloaded: the
directory must hold the files, and a missing or incomplete one is named in the error."""
from __future__ import annotations

from pathlib import Path

import torch

from ..core.errors import CheckpointError, SamplingError

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


def unknown_words_error(prompt: str, unknown, vocabulary) -> SamplingError:
    unknown = list(dict.fromkeys(unknown))
    return SamplingError(f"unknown word{'s' if len(unknown) > 1 else ''} "
                         f"{', '.join(repr(w) for w in unknown)} in prompt {prompt!r}; the "
                         f"vocabulary is: {' '.join(vocabulary)}")


def word_vocabulary(tokenizer) -> tuple[str, ...] | None:
    """The words of a word-level tokenizer (a closed vocabulary, such as the built-in
    digits-text model's), in id order without the special tokens; None for subword tokenizers
    (T5's SentencePiece), which spell any word."""
    try:
        from tokenizers.models import WordLevel

        if not isinstance(tokenizer.backend_tokenizer.model, WordLevel):
            return None
    except (ImportError, AttributeError):
        return None
    specials = set(tokenizer.all_special_tokens)
    return tuple(w for w, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
                 if w not in specials)


class TextEncoder:
    """prompts -> [B, max_length, d_model] float32 text embeddings (LightGen's T5_Embedding).
    With a word-level tokenizer a prompt with a word outside its vocabulary is refused (it
    would be encoded as <unk>, and the picture would be noise)."""

    def __init__(self, encoder, tokenizer, max_length: int, source: str = ""):
        self.encoder, self.tokenizer, self.max_length, self.source = encoder, tokenizer, max_length, source
        self.vocabulary = word_vocabulary(tokenizer)

    def check_words(self, prompt: str) -> None:
        if self.vocabulary is None:
            return
        backend = self.tokenizer.backend_tokenizer
        text = backend.normalizer.normalize_str(prompt) if backend.normalizer else prompt
        words = [w for w, _ in backend.pre_tokenizer.pre_tokenize_str(text)] if backend.pre_tokenizer \
            else text.split()
        known = set(self.vocabulary)
        unknown = [w for w in words if w not in known]
        if unknown:
            raise unknown_words_error(prompt, unknown, self.vocabulary)

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
        for prompt in prompts:
            self.check_words(prompt)
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
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()   # no "Loading weights" bar on every load
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        encoder = T5EncoderModel.from_pretrained(str(path), local_files_only=True, dtype=dtype)
    except Exception as err:  # noqa: BLE001  (safetensors / torch / json errors all mean: unusable)
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CheckpointError(f"{path}: cannot load the T5 encoder or its tokenizer: "
                              f"{type(err).__name__}: {first}") from None
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    if tokenizer.pad_token is None:
        raise CheckpointError(f"{path}: the tokenizer has no pad token (needed to pad to max_length)")
    return TextEncoder(encoder.eval().requires_grad_(False).to(device), tokenizer, max_length, str(path))


# Small T5 encoders built locally (the built-in digits-text model's; tests') ----------------------
SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")   # ids 0, 1, 2, as T5's


def word_tokenizer(words):
    """A lower-casing, whitespace-splitting WordLevel tokenizer over `words` that appends `</s>`
    as T5's does, as a transformers fast tokenizer (save_pretrained writes Hugging Face files)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(SPECIAL_TOKENS + tuple(words)))}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", vocab["</s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", padding_side="right", truncation_side="right")


def random_t5_encoder(vocab_size: int, seed: int, d_model: int, d_kv: int, d_ff: int, num_layers: int,
                      num_heads: int):
    """A T5EncoderModel drawn from one seeded generator (layer norms near 1, weights scaled by
    1/sqrt(fan-in)), so that its outputs are well scaled without training."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=num_layers,
                      num_decoder_layers=num_layers, num_heads=num_heads, relative_attention_num_buckets=8,
                      relative_attention_max_distance=16, dropout_rate=0.0,
                      feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
                      decoder_start_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = T5EncoderModel(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / max(p.shape[-1], 1) ** 0.5)
    return model.eval().requires_grad_(False)
