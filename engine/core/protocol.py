"""The family protocol: what every loaded model offers the shared code.

`engine.generate`, `accelerate` / `patch`, the CLI, the serving scheduler and the distributed
jobs reach a family only through these attributes and methods; none of them branches on a
family's name. A family implements them in its own place (engine/families/<name>) and adds one
line to the registry (engine/families/__init__.py). See docs/contributing.md, "Adding a family".

Attributes
  family         the registry name ("mar", ...): data for messages and records, never a branch
  conditioning   "class" (labels; None = unconditional) or "text" (prompts / encoder outputs)
  decoder        what turns tokens into images: "vae" (engine.load_vae), "bae" (engine.load_bae;
                 a model may ship its own as `model.bae`) or "pixels" (the tokens are pixels)
  sampling_defaults   settings recorded with the model (engine directories), over the family's
  num_classes    class models: the number of classes; text models: `text_shape` (max_length,
                 channels) of the encoder outputs they read, and `texts_for(prompts, texts,
                 text_encoder, num_images)` -> (encoder outputs, batch size)

Methods
  resolve_settings(**given) -> dict
      The family's settings (num_iter, cfg, cfg_schedule, temperature, and whatever else it
      takes: top_k, top_p, ...), each None replaced by the model's recorded default, else the
      published one; every value checked. A setting the family does not take, given non-None,
      is refused. Errors are `SettingError`s naming the setting.
  generate_images(labels=, prompts=, texts=, text_encoder=, num_images=, height=, width=,
                  generator=, progress=, vae=, bae=, **settings) -> float [N, C, H, W] in [0, 1]
      engine.generate's work: conditions -> the family's batch sampler -> decode.
  sample_tokens(bsz, labels= | texts=, generator=, progress=, **settings) -> tokens
      the family's batch sampler (the published signature and results, plus the engine's
      per-image settings and generators); `settings` as resolve_settings returns them.
  image_shape(height=None, width=None, vae=None, bae=None) -> (H, W, C) of its images.
  decode(tokens, vae=None, bae=None) -> float [N, C, H, W] in [0, 1]
  batcher(max_images) -> Batcher
      Iteration-level batching (engine.serving): images of different requests in flight at
      once, each at its own step, joining and leaving between any two steps.

A `Batcher` (one per scheduler; it owns per-image state such as KV-cache slots):
  add(label=None, texts=None, settings=dict, generator=torch.Generator) -> image
      one image in flight; `image.done` tells when its last step ran, `image.num_steps` how many
      steps it takes in all, `image.shape_key` which images may share its next transformer
      pass (equal keys). Raises SamplingError (this request cannot run: e.g. no null class
      for CFG) before anything is allocated.
  step(images) -> list of the images that finished
      one step of every image given (any subset of those in flight, each once, none done):
      images at the same step shape share the transformer pass. Image i's tokens equal what the
      family's batch sampler gives it alone with the same settings and generator, whatever else
      is in flight and however the images in flight are split over calls. A step that raises
      leaves every image and buffer as it was (no image advanced, no row claimed); only the
      generators may have been drawn from, and the caller, who made them, restores their state
      (the scheduler retries a failed step by groups, then image by image: engine.serving).
  release(image)   frees what the image holds (done, cancelled or failed)
  tokens(images) -> the tokens of finished images, as the family's sample_tokens returns them
  preview(images) -> the tokens of images in flight so far, in the layout of `tokens` (streamed
      partial images): positions not sampled yet hold the family's blank, documented there
"""
from __future__ import annotations

from .errors import SamplingError
from .plan import MAX_BATCH, check_count

CONDITIONINGS = ("class", "text")
DECODERS = ("vae", "bae", "pixels")


class SettingError(SamplingError):
    """A sampling setting that cannot be honoured; `setting` names it (the message starts with it)."""

    def __init__(self, setting: str, message: str):
        super().__init__(message if message.startswith(setting) else f"{setting}: {message}")
        self.setting = setting

    def __reduce__(self):   # picklable (Ray, LitServe workers)
        return type(self), (self.setting, str(self))


def each(check):
    """A check for a setting given once or once per image (a list / tuple / array: each entry
    checked, the sequence kept as given for the sampler that takes it per image)."""
    def checked(value):
        if isinstance(value, (list, tuple)) or (hasattr(value, "ndim") and getattr(value, "ndim", 0) > 0):
            for v in (value.tolist() if hasattr(value, "tolist") else value):
                check(v)
            return value
        return check(value)
    return checked


def resolve_settings(given: dict, defaults: dict, checks: dict, recorded: dict | None = None) -> dict:
    """Each setting of `defaults`: the caller's value, else the model's `recorded` default, else
    the family's; then `checks[name](value)` (errors become SettingErrors naming it). A setting
    the family does not take is refused when given (None means not given)."""
    for name, value in given.items():
        if name not in defaults and value is not None:
            raise SettingError(name, f"{name} is not a setting of this model; it takes "
                                     f"{', '.join(sorted(defaults))}")
    recorded = {k: v for k, v in (recorded or {}).items() if k in defaults}
    out = {}
    for name, default in {**defaults, **recorded}.items():
        value = given.get(name)
        value = default if value is None else value
        check = checks.get(name)
        if check is not None:
            try:
                value = check(value)
            except SamplingError as err:
                raise SettingError(name, str(err)) from None
        out[name] = value
    return out


def check_image_generator(generator):
    """An image in flight draws from a torch.Generator of its own (Batcher.add's `generator`)."""
    import torch

    if not isinstance(generator, torch.Generator):
        raise SamplingError(f"an image in flight needs its own torch.Generator, got {type(generator).__name__}")
    return generator


def check_num_images(num_images):
    """None, or num_images as a count of images (1 .. MAX_BATCH)."""
    return None if num_images is None else check_count("num_images", num_images, MAX_BATCH)


def labels_and_batch(labels, num_images) -> tuple:
    """(labels as a list or None, batch size) of a class-conditional call."""
    num_images = check_num_images(num_images)
    if labels is None:
        if num_images is None:
            raise SamplingError("pass labels, or num_images for unconditional samples")
        return None, num_images
    if isinstance(labels, (str, bytes, dict, set, frozenset)) or not hasattr(labels, "__len__") \
            or getattr(labels, "ndim", 1) == 0:
        raise SamplingError(f"labels must be a list of class labels, got {labels!r:.80}")
    labels = list(labels.tolist() if hasattr(labels, "tolist") else labels)
    if not labels:
        raise SamplingError("labels is empty; pass at least one class label")
    if len(labels) > MAX_BATCH:
        raise SamplingError(f"labels: {len(labels)} images exceed the limit of {MAX_BATCH} per call")
    if num_images is not None and num_images != len(labels):
        raise SamplingError(f"num_images={num_images} but {len(labels)} labels")
    return labels, len(labels)
