"""One process's share of a job: the loaded model (+ VAE, text encoder) on its device, the
fingerprint of the weights it uses, its execution environment, and the sampling of one
canonical group into uint8 images."""
from __future__ import annotations

import hashlib
import os

import numpy as np
import torch

from ..arguments import config_overrides
from ..core.errors import EngineError
from .job import Request


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """"auto": CUDA when available, else CPU. Under torchrun "cuda" means cuda:LOCAL_RANK."""
    from .. import check_device

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = check_device(device)
    if dev.type == "cuda" and dev.index is None:
        if local_rank >= torch.cuda.device_count():
            raise EngineError(f"local rank {local_rank} has no GPU: {torch.cuda.device_count()} visible "
                              "(use --nproc_per_node <= the number of GPUs)")
        dev = torch.device("cuda", local_rank)
    return dev


def deterministic_cuda() -> None:
    """Same inputs -> same bits on a GPU: no cuDNN autotuning (the VAE's convolutions), cuBLAS
    with a fixed workspace. Must run before the first cuBLAS handle is created."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def weights_fingerprint(obj, extra: str = "") -> str:
    """blake2b of every tensor (name, dtype, shape, bytes) the object samples with, in name
    order: the weights themselves, wherever the file lives."""
    inner = obj
    if not hasattr(inner, "state_dict"):
        inner = getattr(obj, "vae", None) or getattr(obj, "encoder", None)
    state = inner.state_dict()
    h = hashlib.blake2b(digest_size=16)
    h.update(extra.encode())
    for name in sorted(state):
        t = state[name].detach()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.reshape(-1).contiguous().cpu().view(torch.uint8).numpy().data)
    return h.hexdigest()


class GroupSampler:
    """Loads what a request needs and samples canonical groups."""

    def __init__(self, request: Request, device: torch.device):
        import engine

        self.request, self.device = request, device
        if device.type == "cpu":
            torch.set_num_threads(request.threads)
        else:
            deterministic_cuda()
        r = request
        self.model = engine.load(r.checkpoint, device=device, backend=r.backend, num_sampling_steps=r.steps,
                                 precision=r.precision, family=r.family, **config_overrides(r.config))
        self.vae = engine.load_vae(r.vae, device=device) if r.vae else None
        self.bae = engine.load_bae(r.bae, device=device) if r.bae else None
        self.encoder = None
        if r.text_encoder and self.model.conditioning == "text":
            self.encoder = engine.load_text_encoder(r.text_encoder, max_length=self.model.config.max_length,
                                                    device=device)

    def weights(self) -> dict:
        """Fingerprints of the weights this process samples with (not their file names)."""
        out = {"family": self.model.family, "model": weights_fingerprint(self.model)}
        if self.vae is not None:
            out["vae"] = weights_fingerprint(self.vae)
        bae = self.bae if self.bae is not None else getattr(self.model, "bae", None)
        if bae is not None:
            out["bae"] = weights_fingerprint(bae)
        if self.encoder is not None:
            vocab = sorted(self.encoder.tokenizer.get_vocab().items())
            out["text_encoder"] = weights_fingerprint(self.encoder, f"{self.encoder.max_length}:{vocab}")
        return out

    def env(self) -> dict:
        """What else the bits depend on: backend, device kind, CPU threads, torch."""
        dev = self.device
        kind = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
        return {"backend": self.model.backend_name, "device": kind,
                "threads": torch.get_num_threads() if dev.type == "cpu" else None,
                "torch": torch.__version__}

    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of the images this job writes."""
        r = self.request
        return self.model.image_shape(r.height, r.width, vae=self.vae, bae=self.bae)

    def sample(self, job, start: int, stop: int) -> np.ndarray:
        """uint8 images [stop - start, H, W, C] of one canonical group, in index order."""
        import engine
        from ..images import to_uint8

        call = job.group_of(start, stop)
        gens = [torch.Generator().manual_seed(s) for s in call["seeds"]]
        kw = dict(vae=self.vae, bae=self.bae, generator=gens, output_type="pt", **job.settings)
        if "labels" in call:
            images = engine.generate(self.model, call["labels"], **kw)
        else:
            images = engine.generate(self.model, prompts=call["prompts"], text_encoder=self.encoder,
                                     height=self.request.height, width=self.request.width, **kw)
        return to_uint8(images.permute(0, 2, 3, 1).numpy())

    def sample_item(self, job, start: int, stop: int) -> np.ndarray:
        """Images [start, stop) of a work item, one call per canonical group it spans."""
        g = job.group_size
        return np.concatenate([self.sample(job, a, min(a + g, stop)) for a in range(start, stop, g)])
