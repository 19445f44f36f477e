"""Coverage-guided byte-level fuzzing of the checkpoint readers with atheris (libFuzzer).

    python tests/fuzz/atheris_readers.py -runs=100000 -rss_limit_mb=8192 -artifact_prefix=/tmp/crash-   # by hand
    (tests/fuzz/test_fuzz_atheris.py runs a bounded number of inputs in CI)

The first byte picks the reader (published .pth, an engine directory's weights or config.json,
a BAE file as safetensors or .th); the rest is the file. The corpus starts from the small valid
files of fuzz_targets.SEEDS. Any exception other than an engine error is a crash."""
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["engine"]):
    import fuzz_targets as targets

READERS = ("pth", "weights", "config", "bae.safetensors", "bae.th")


def run_one(data: bytes) -> None:
    if not data:
        return
    reader, blob = READERS[data[0] % len(READERS)], data[1:]
    if reader == "pth":
        targets.load_file_bytes(blob, "checkpoint.pth")
    elif reader == "weights":
        targets.load_engine_dir_bytes(blob, targets._DIR_SEED[1])
    elif reader == "config":
        targets.load_engine_dir_bytes(targets._DIR_SEED[0], blob)
    elif reader == "bae.safetensors":
        targets.load_bae_bytes(blob, ".safetensors")
    else:
        targets.load_bae_bytes(blob, ".th")


def write_corpus(folder: Path) -> None:
    seeds = {"pth": targets.seed_bytes("mar.pth"), "weights": targets._DIR_SEED[0],
             "config": targets._DIR_SEED[1], "bae.safetensors": targets.seed_bytes("bae.safetensors"),
             "bae.th": (targets.DATA / "elm" / "binaryae_ema.th").read_bytes()}
    for index, reader in enumerate(READERS):
        (folder / reader).write_bytes(bytes([index]) + seeds[reader])


def main() -> None:
    corpus = Path(tempfile.mkdtemp(prefix="engine-fuzz-corpus-"))
    write_corpus(corpus)
    args = [a for a in sys.argv if not a.startswith("-max_len")]
    atheris.Setup(args + [str(corpus), "-max_len=1100000"], run_one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
