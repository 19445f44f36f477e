"""Finished work on disk: `OUT.npz.parts/` holds `manifest.json` (the job's spec) and one
`part-{start:09d}-{stop:09d}.npz` per finished work item (images, indices, labels and a meta
record naming the spec and the sha256 of the images), each written to a temporary file, synced
and renamed into place, so a killed process leaves whole parts or none. The merge streams the
parts, in index order, into OUT.npz (arr_0 uint8 [N, H, W, C], labels [N]; ADM / DiT format)
after checking that every index is present exactly once and every part belongs to the spec."""
from __future__ import annotations

import hashlib
import json
import re
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..core.errors import EngineError
from .job import FORMAT, spec_diff, spec_hash

PART_RE = re.compile(r"^part-(\d{9})-(\d{9})\.npz$")


def _write_synced(out: Path, arrays: dict) -> None:
    """np.savez into a temporary file beside `out`, fsync, rename (engine.arguments.write_atomically)."""
    from ..arguments import write_atomically

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    write_atomically(out, write)


def _text(value: str) -> np.ndarray:
    return np.array(value)   # a 0-d unicode array: loads without pickle


def read_meta(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as data:
        return json.loads(str(data["meta"]))


class PartStore:
    def __init__(self, out):
        self.out = Path(out)
        self.dir = self.out.with_name(self.out.name + ".parts")
        self.manifest_path = self.dir / "manifest.json"

    # The manifest -------------------------------------------------------------------------
    def read_manifest(self) -> dict | None:
        try:
            return json.loads(self.manifest_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            raise EngineError(f"{self.manifest_path} is unreadable ({err}); delete {self.dir} to start over") from None

    def check(self, spec: dict, keys=("format", "engine", "args", "weights", "env")) -> None:
        """Refuse to resume parts made with another spec (only `keys` are compared: a driver
        that does not know the workers' environment yet checks the rest)."""
        old = self.read_manifest()
        if old is None:
            return
        diff = spec_diff({k: old.get(k) for k in keys}, {k: spec.get(k) for k in keys})
        if diff:
            raise EngineError(f"{self.dir} holds parts made with other arguments ({'; '.join(diff[:4])}"
                              f"{'; ...' if len(diff) > 4 else ''}): rerun with the arguments they were made "
                              f"with to resume, or delete {self.dir} (or choose another --out) to start over")

    def write_manifest(self, spec: dict) -> None:
        """Create the parts directory (one level, beside --out) and record the spec."""
        self.dir.mkdir(exist_ok=True)
        if self.read_manifest() == spec:
            return
        from ..arguments import write_atomically

        text = json.dumps(spec, indent=1, sort_keys=True) + "\n"
        write_atomically(self.manifest_path, lambda tmp: Path(tmp).write_text(text))

    def check_output(self, spec: dict) -> bool:
        """True when --out already holds this job's result; an --out made otherwise is refused."""
        if not self.out.exists():
            return False
        try:
            with np.load(self.out, allow_pickle=False) as data:
                old = json.loads(str(data["spec"])) if "spec" in data.files else None
        except Exception:  # noqa: BLE001 - anything unreadable is not ours to overwrite silently
            old = None
        if old is None:
            raise EngineError(f"--out {self.out} exists and was not written by engine generate; "
                              "remove it or choose another --out")
        diff = spec_diff(old, spec)
        if diff:
            raise EngineError(f"--out {self.out} exists and was made with other arguments "
                              f"({'; '.join(diff[:4])}); remove it or choose another --out")
        return True

    # Parts --------------------------------------------------------------------------------
    def clean_temporaries(self) -> None:
        """Temporary files of processes killed mid-write (never renamed, never read)."""
        if self.dir.is_dir():
            for tmp in self.dir.glob(".part-*"):
                tmp.unlink(missing_ok=True)

    def part_path(self, start: int, stop: int) -> Path:
        return self.dir / f"part-{start:09d}-{stop:09d}.npz"

    def parts(self) -> list[tuple[int, int, Path]]:
        if not self.dir.is_dir():
            return []
        found = []
        for p in self.dir.iterdir():
            m = PART_RE.match(p.name)
            if m:
                found.append((int(m.group(1)), int(m.group(2)), p))
        return sorted(found)

    def done_images(self) -> int:
        return sum(b - a for a, b, _ in self.parts())

    def write_part(self, spec: dict, start: int, stop: int, images: np.ndarray, labels: np.ndarray,
                   rank: int = 0) -> Path:
        images = np.ascontiguousarray(images, dtype=np.uint8)
        meta = {"format": FORMAT, "spec": spec_hash(spec), "start": start, "stop": stop, "rank": rank,
                "shape": list(images.shape), "sha256": hashlib.sha256(images.data).hexdigest()}
        path = self.part_path(start, stop)
        _write_synced(path, {"images": images, "indices": np.arange(start, stop, dtype=np.int64),
                             "labels": np.asarray(labels, np.int64), "meta": _text(json.dumps(meta))})
        return path

    def done_groups(self, spec: dict, group_size: int, num_images: int) -> set[int]:
        """Groups covered by this spec's parts. A part of another spec is refused; one that cannot
        be read (a disk that lost it) is removed, and its images are made again."""
        want, done = spec_hash(spec), set()
        for start, stop, path in self.parts():
            try:
                meta = read_meta(path)
            except Exception:  # noqa: BLE001
                path.unlink(missing_ok=True)
                continue
            if meta.get("spec") != want:
                raise EngineError(f"{path} was made with other arguments (spec {meta.get('spec')}, this "
                                  f"run {want}); delete {self.dir} to start over")
            if start % group_size or not (stop % group_size == 0 or stop == num_images) or stop > num_images:
                raise EngineError(f"{path} does not cover whole groups of {group_size} images; delete "
                                  f"{self.dir} to start over")
            done.update(range(start // group_size, -(-stop // group_size)))
        return done

    # The merge ----------------------------------------------------------------------------
    def merge(self, spec: dict, labels: np.ndarray, prompts: list | None = None,
              png_dir=None, keep_parts: bool = False) -> tuple[int, ...]:
        """Check and stream every part into --out; returns arr_0's shape."""
        num_images, want = int(spec["args"]["num_images"]), spec_hash(spec)
        owner = np.full(num_images, -1, dtype=np.int64)
        parts = self.parts()
        shape = None
        for k, (start, stop, path) in enumerate(parts):
            meta = read_meta(path)
            if meta.get("spec") != want:
                raise EngineError(f"refusing to merge {path}: it was made with other arguments")
            if stop > num_images or start >= stop:
                raise EngineError(f"refusing to merge {path}: indices [{start}, {stop}) outside [0, {num_images})")
            taken = owner[start:stop] >= 0
            if taken.any():
                other = parts[int(owner[start:stop][taken][0])][2].name
                raise EngineError(f"refusing to merge: image {start + int(np.argmax(taken))} is in both "
                                  f"{path.name} and {other}")
            owner[start:stop] = k
            if shape is None:
                shape = tuple(meta["shape"][1:])
            elif tuple(meta["shape"][1:]) != shape:
                raise EngineError(f"refusing to merge {path}: images of shape {meta['shape'][1:]} among {list(shape)}")
        missing = np.flatnonzero(owner < 0)
        if missing.size:
            raise EngineError(f"cannot merge: {missing.size} of {num_images} images are missing (first "
                              f"{missing[0]}); rerun the same command to make them")
        full = (num_images, *shape)
        png = Path(png_dir) if png_dir is not None else None
        if png is not None:
            png.mkdir(exist_ok=True)
        from ..arguments import write_atomically

        def write(tmp):
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf, \
                    ThreadPoolExecutor(4) as pool:
                with zf.open("arr_0.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array_header_1_0(
                        f, {"descr": "|u1", "fortran_order": False, "shape": full})
                    for start, stop, path in parts:
                        images = self._checked_images(path, start, stop, labels)
                        f.write(images.tobytes())
                        if png is not None:
                            list(pool.map(lambda i: _write_png(png, start + i, images[i]), range(len(images))))
                extra = {"labels": np.asarray(labels, np.int64), "spec": _text(json.dumps(spec, sort_keys=True))}
                if prompts is not None:
                    extra["prompts"] = np.asarray(prompts, dtype=str)
                for name, arr in extra.items():
                    with zf.open(name + ".npy", "w", force_zip64=True) as f:
                        np.lib.format.write_array(f, arr, allow_pickle=False)
        write_atomically(self.out, write)
        if not keep_parts:
            self.remove()
        return full

    def _checked_images(self, path: Path, start: int, stop: int, labels: np.ndarray) -> np.ndarray:
        with np.load(path, allow_pickle=False) as data:
            images, indices, part_labels = data["images"], data["indices"], data["labels"]
            meta = json.loads(str(data["meta"]))
        if hashlib.sha256(np.ascontiguousarray(images).data).hexdigest() != meta["sha256"] \
                or not np.array_equal(indices, np.arange(start, stop)) or images.dtype != np.uint8:
            raise EngineError(f"refusing to merge {path}: its images fail their checksum (a damaged "
                              "file); delete it and rerun the same command to make it again")
        if not np.array_equal(part_labels, labels[start:stop]):
            raise EngineError(f"refusing to merge {path}: its labels are not this job's")
        return images

    def remove(self) -> None:
        for p in self.dir.iterdir() if self.dir.is_dir() else ():
            p.unlink(missing_ok=True)
        if self.dir.is_dir():
            self.dir.rmdir()


def _write_png(png_dir: Path, index: int, image: np.ndarray) -> None:
    from PIL import Image

    from ..arguments import write_atomically

    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    write_atomically(png_dir / f"{index:05d}.png", lambda tmp: pil.save(tmp, format="PNG"))


def write_pngs(out: Path, png_dir) -> None:
    """PNGs {i:05d}.png of a finished --out (a rerun that adds --png-dir)."""
    png = Path(png_dir)
    png.mkdir(exist_ok=True)
    with np.load(out, allow_pickle=False) as data:
        arr = data["arr_0"]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: _write_png(png, i, arr[i]), range(len(arr))))
