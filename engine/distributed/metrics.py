"""Scores of a finished .npz, on rank 0 after the merge (or `compute_metrics(...)` on any file).

* Default, offline: for digit images (one channel, square, side divisible by 4) the built-in
  digits classifier of engine.evaluate: its accuracy on the requested classes and the Fréchet
  distance of its 64-d features to the 359 held-out real digits, or to `--fid-ref`'s images.
* `--inception-weights FILE` (+ `--fid-ref REF.npz` for FID): FID and Inception Score through
  torch-fidelity's InceptionV3 (`inception-v3-compat`, the TF-FID network) loaded from that local
  file. The engine never downloads it: without the file, or without torch-fidelity installed,
  it stops before sampling with one line saying what to supply.
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..core.errors import EngineError

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"


def npz_array_info(path, name: str = "arr_0", what: str = "--fid-ref") -> tuple[tuple, np.dtype]:
    """(shape, dtype) of one array of an .npz, read from its header (no data is loaded)."""
    try:
        with zipfile.ZipFile(path) as zf, zf.open(name + ".npy") as f:
            version = np.lib.format.read_magic(f)
            read = {(1, 0): np.lib.format.read_array_header_1_0,
                    (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read is None:
                raise ValueError(f"unsupported .npy format version {version}")
            shape, _, dtype = read(f)
    except FileNotFoundError:
        raise EngineError(f"{what} {path}: file not found") from None
    except KeyError:
        raise EngineError(f"{what} {path}: no {name} array (expected ADM's format: arr_0 uint8 "
                          "[N, H, W, C])") from None
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise EngineError(f"{what} {path}: not a readable .npz ({err})") from None
    return shape, dtype


def digit_images(shape) -> bool:
    h, w, c = shape
    return c == 1 and h == w and h % 4 == 0


class Metrics:
    """What to score, checked before sampling, computed after the merge."""

    def __init__(self, fid_ref=None, inception_weights=None, enabled: bool = True, json_out=None):
        self.fid_ref = fid_ref
        self.inception_weights = inception_weights
        self.enabled = enabled
        self.json_out = json_out
        self.kind = None   # "digits", "inception" or None

    def check(self, shape) -> None:
        """Before sampling: everything the metrics need is there (`shape`: the images' H, W, C)."""
        if not self.enabled:
            if self.fid_ref or self.inception_weights:
                raise EngineError("--no-metrics contradicts --fid-ref / --inception-weights")
            return
        shape = tuple(shape)
        if self.json_out is not None:
            parent = Path(self.json_out).parent
            if not parent.is_dir():
                raise EngineError(f"--metrics-json {self.json_out}: directory {parent} does not exist")
        if self.inception_weights is not None:
            weights = Path(self.inception_weights)
            if not weights.is_file():
                raise EngineError(f"--inception-weights {weights}: file not found. FID/IS need torch-fidelity's "
                                  f"InceptionV3 weights ({INCEPTION_FILE}) on local disk; the engine never "
                                  "downloads them")
            try:
                import torch_fidelity  # noqa: F401
            except Exception as err:  # noqa: BLE001 - a broken torchvision raises other errors too
                first = str(err).splitlines()[0] if str(err) else ""
                raise EngineError(f"FID/IS need torch-fidelity (pip install 'engine[fid]', with the "
                                  f"torchvision that matches your torch): {type(err).__name__}: {first}") from None
            self.kind = "inception"
        elif digit_images(shape):
            self.kind = "digits"
        elif self.fid_ref is not None:
            raise EngineError(f"--fid-ref: FID of {shape[2]}-channel {shape[0]}x{shape[1]} images needs "
                              f"--inception-weights FILE (torch-fidelity's {INCEPTION_FILE}, local); the "
                              "built-in digits features read single-channel digit images only")
        if self.fid_ref is not None:
            ref_shape, dtype = npz_array_info(self.fid_ref)
            if len(ref_shape) != 4 or dtype != np.uint8 or ref_shape[0] < 2:
                raise EngineError(f"--fid-ref {self.fid_ref}: arr_0 must be uint8 [N >= 2, H, W, C], got "
                                  f"{dtype} {list(ref_shape)}")
            if self.kind == "digits" and tuple(ref_shape[1:]) != shape:
                raise EngineError(f"--fid-ref {self.fid_ref}: images {list(ref_shape[1:])}, but the "
                                  f"generated ones are {list(shape)}")

    def compute(self, out, device="cpu", log=print) -> dict:
        """The scores of a finished .npz (after `check`)."""
        if self.kind is None:
            return {}
        with np.load(out, allow_pickle=False) as data:
            images = data["arr_0"]
            labels = data["labels"] if "prompts" not in data.files else None
        ref = None
        if self.fid_ref is not None:
            with np.load(self.fid_ref, allow_pickle=False) as data:
                ref = data["arr_0"]
        if self.kind == "digits":
            result = digits_metrics(images, labels, ref)
        else:
            try:
                result = inception_metrics(images, ref, self.inception_weights, torch.device(device).type == "cuda")
            except Exception as err:  # noqa: BLE001 - torch-fidelity's errors, one line each
                first = str(err).strip().splitlines()[0] if str(err).strip() else ""
                raise EngineError(f"torch-fidelity could not score {out} (the images are written): "
                                  f"{type(err).__name__}: {first}") from None
        if log:
            log("metrics: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                        for k, v in result.items()))
        if self.json_out is not None:
            from ..arguments import write_atomically

            text = json.dumps(result, indent=1) + "\n"
            write_atomically(Path(self.json_out), lambda tmp: Path(tmp).write_text(text))
        return result


def _to_model_range(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 1] -> float [N, 1, H, W] in [-1, 1] (the classifier's input range)."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def digits_metrics(images: np.ndarray, labels=None, ref: np.ndarray | None = None) -> dict:
    """engine.evaluate's classifier on uint8 digit images: accuracy (labels 0-9 given) and the
    Fréchet distance of its features to the held-out real digits, or to `ref`'s images."""
    from ..builtin.digits import NUM_CLASSES
    from ..builtin.evaluate import classify, frechet_distance, load_classifier, make_reference

    size = images.shape[1]
    x = _to_model_range(images)
    out = {"features": "digits"}
    if ref is None:
        reference = make_reference(size, max(1, len(images) // NUM_CLASSES))
        clf, ref_feats = reference.clf, reference.heldout_features
        out["reference"] = f"{len(ref_feats)} held-out real digits"
    else:
        clf, _ = load_classifier(size)
        ref_feats = classify(clf, _to_model_range(ref))[1]
        out["reference"] = f"{len(ref)} images of --fid-ref"
    pred, feats = classify(clf, x)
    out["fd"] = frechet_distance(feats, ref_feats)
    if ref is None:
        out["fd_real_vs_real"] = reference.real_vs_real_fd
    if labels is not None and len(labels) and int(np.max(labels)) < NUM_CLASSES:
        out["accuracy"] = float((pred.numpy() == np.asarray(labels)).mean())
    out["count"] = len(images)
    return out


class _Uint8Dataset(torch.utils.data.Dataset):
    """NHWC uint8 -> [3, H, W] uint8 tensors, what torch-fidelity reads (grey repeated)."""

    def __init__(self, images: np.ndarray):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        x = torch.from_numpy(np.ascontiguousarray(self.images[i])).permute(2, 0, 1)
        return x.expand(3, -1, -1).contiguous() if x.shape[0] == 1 else x


def inception_metrics(images: np.ndarray, ref: np.ndarray | None, weights, cuda: bool) -> dict:
    """FID (with `ref`) and Inception Score through torch-fidelity, InceptionV3 from `weights`."""
    import torch_fidelity

    kw = dict(input1=_Uint8Dataset(images), isc=True, fid=ref is not None, cuda=cuda, cache=False,
              verbose=False, feature_extractor="inception-v3-compat",
              feature_extractor_weights_path=str(weights), datasets_download=False)
    if ref is not None:
        kw["input2"] = _Uint8Dataset(ref)
    res = torch_fidelity.calculate_metrics(**kw)
    out = {"features": "inception-v3-compat", "inception_score": float(res["inception_score_mean"]),
           "inception_score_std": float(res["inception_score_std"]), "count": len(images)}
    if ref is not None:
        out["fid"] = float(res["frechet_inception_distance"])
    return out


def compute_metrics(out, fid_ref=None, inception_weights=None, device="cpu") -> dict:
    """Scores of a finished generate .npz: digits features by default, FID / IS with
    `inception_weights` (see the module doc)."""
    shape, _ = npz_array_info(out, what="metrics of")
    metrics = Metrics(fid_ref, inception_weights)
    metrics.check(shape[1:])
    if metrics.kind is None:
        raise EngineError(f"{out}: {list(shape[1:])} images need inception_weights (the digits features "
                          "read single-channel digit images only)")
    return metrics.compute(out, device, log=None)
