"""What every command shares (sample, generate, serve, evaluate): the family and sampling-setting
arguments (each family checks and fills its own settings: resolve_settings), and the checked,
atomically written output files."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .core.errors import EngineError

OUTPUT_SUFFIXES = (".png", ".jpg", ".jpeg", ".npz")


def check_output(path: str) -> Path:
    """An output file whose directory exists and is writable, with a known extension."""
    out = Path(path)
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise EngineError(f"--out {path}: unknown extension {out.suffix or '(none)'!r}; use one of "
                          f"{', '.join(OUTPUT_SUFFIXES)}")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise EngineError(f"--out {path}: directory {parent} does not exist (create it first)")
    try:   # a real write, not os.access: root passes access checks on read-only file systems
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".engine-write-test.")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise EngineError(f"--out {path}: cannot write in directory {parent} ({err.strerror})") from None
    if out.is_dir():
        raise EngineError(f"--out {path} is a directory; give a file name")
    return out


def write_atomically(out: Path, write) -> None:
    """`write(tmp_path)` to a temporary file beside `out`, flushed to disk with the usual
    permissions, then renamed into place."""
    fd, tmp = tempfile.mkstemp(dir=out.parent if str(out.parent) else ".", prefix=f".{out.name}.",
                               suffix=out.suffix)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:      # on disk before the rename makes it the output
            os.fsync(f.fileno())
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)   # mkstemp's 0600 would otherwise become the output's mode
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise



def check_threads(value, flag: str = "--threads", minimum: int = 1) -> None:
    """A command's `--threads`: None (torch's default) or an integer of at least `minimum`
    (0 where the command reads it as "keep torch's setting": train)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
        keep = " (0 keeps torch's setting)" if minimum == 0 else ""
        raise EngineError(f"{flag} must be an integer of at least {minimum}{keep}, got {value!r}")


def set_threads(value, flag: str = "--threads", minimum: int = 1) -> None:
    """torch's CPU threads from a command's `--threads` (None, or 0 where `minimum` allows it:
    torch's setting is kept)."""
    check_threads(value, flag, minimum)
    if value:
        import torch

        torch.set_num_threads(value)


def check_decoder_arguments(model, vae, bae, images_required: bool = True, tokens_instead: str = "") -> bool:
    """`--vae` / `--bae` against what the model's tokens decode with; whether its tokens can
    become images (a decoder given, its own BAE, or pixels). Where `images_required`, a missing
    decoder is refused, offering the command's way to keep the tokens (`tokens_instead`)."""
    decoder = model.decoder
    if vae and decoder != "vae":
        own = "its BAE (--bae)" if decoder == "bae" else "no decoder (pixels)"
        raise EngineError(f"this model's tokens decode with {own}; --vae is for VAE-latent models")
    if bae and decoder != "bae":
        raise EngineError("--bae is for models with binary tokens (ELM's, CTF)")
    decodable = {"vae": bool(vae), "bae": bool(bae) or getattr(model, "bae", None) is not None}.get(decoder, True)
    if not decodable and images_required:
        what = ("VAE latents: pass --vae (kl16.ckpt, or an AutoencoderKL directory)" if decoder == "vae"
                else "binary tokens: pass --bae (ELM's binaryae_ema.th)")
        instead = f", or {tokens_instead}" if tokens_instead else " to decode them into images"
        raise EngineError(f"this model generates {what}{instead}")
    return decodable


def add_family_argument(parser) -> None:
    from .families import families

    parser.add_argument("--family", default=None, choices=sorted(families()),
                        help="model family (default: recognised from the checkpoint)")


def add_config_argument(parser) -> None:
    parser.add_argument("--config", action="append", default=None, metavar="KEY=VALUE",
                        help="a configuration field the checkpoint does not record (e.g. n_head=16 for ELM's "
                             "bare state dicts), as engine.load(..., KEY=VALUE); repeat for several")


def config_overrides(pairs) -> dict:
    """`--config KEY=VALUE` pairs as engine.load keyword arguments: VALUE read as JSON (numbers,
    true / false, null, lists) where it parses, else kept as a string."""
    import json

    out = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise EngineError(f"--config {pair!r}: expected KEY=VALUE with KEY a configuration field name")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def add_setting_arguments(parser) -> None:
    """The sampling settings every command takes; each family checks and fills its own."""
    parser.add_argument("--num-iter", type=int, default=None,
                        help="sampling steps (default: the model's, else the family's published one)")
    parser.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the model's, or 1)")
    parser.add_argument("--cfg-schedule", default=None, help="e.g. linear, constant (default: the model's)")
    parser.add_argument("--temperature", type=float, default=None, help="(default: the model's, or 1)")
    parser.add_argument("--top-k", type=int, default=None, help="top-k of the categorical draw (binary-token models)")
    parser.add_argument("--top-p", type=float, default=None, help="top-p of the categorical draw (binary-token models)")
    parser.add_argument("--fast", type=fast_argument, default=None,
                        help="approximate sampling: exact (default), disa, lazy, speculative, joined by '+', "
                             "or a JSON object of their parameters, e.g. '{\"disa\": {\"lower\": 8}}' "
                             "(docs/fast.md; each family has its own)")


def fast_argument(value: str):
    """--fast: a mode string, or a JSON object {method: {parameter: value}}."""
    import json

    if value.strip().startswith("{"):
        try:
            return json.loads(value)
        except ValueError:
            pass   # refused by the family's check, one line naming fast
    return value
