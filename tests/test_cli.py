"""The command line: every user error is one line and exit code 2, checked before sampling;
no partial files, no directory trees created; image i is sampled with seed + i."""
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import engine
from engine.cli import main


def run(argv):
    """main() in a subprocess: the exit code and stderr as a user sees them."""
    proc = subprocess.run([sys.executable, "-m", "engine", *argv], capture_output=True, text=True,
                          timeout=120)
    return proc.returncode, proc.stderr


@pytest.mark.parametrize("argv,message", [
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--per-class", "0"], "--per-class must be at least 1"),
    (["--seed", "99999999999999999999999"], "--seed must be in"),
    (["--seed", "-1"], "--seed must be in"),
    (["--out", "x.txt"], "unknown extension '.txt'"),
    (["--out", "/nonexistent/new/tree/x.png"], "does not exist (create it first)"),
    (["--prompt", "a cat"], "class-conditional model: pass --classes"),
    (["--height", "32"], "--height / --width are for text-to-image models"),
    (["--classes", "10"], "label 10 is out of range"),
    (["--checkpoint", "/nonexistent.pth"], "checkpoint not found"),
    (["--fast", "warp"], "fast: unknown mode 'warp'"),
    (["--fast", "speculative"], "fast: mar models cannot use 'speculative'"),
    (["--fast", "{\"disa\": {\"lower\": 0}}"], "fast: disa lower must be an integer"),
    (["--fast", "{bad json"], "fast: unknown mode '{bad json'"),
])
def test_user_errors_are_one_line(tmp_path, argv, message):
    argv = ["sample", *argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "x.png")]
    start = time.monotonic()
    code, err = run(argv)
    assert code == 2, err
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("error: "), err
    assert message in err, err
    assert time.monotonic() - start < 60
    assert not list(tmp_path.iterdir())   # nothing written, not even a partial file
    assert not (tmp_path.parent / "nonexistent").exists()


def test_unwritable_directory(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        # root may write anywhere (CI runs as root): /proc refuses new files even to root.
        target = "/proc/x.png" if os.geteuid() == 0 else str(locked / "x.png")
        code, err = run(["sample", "--num-iter", "1", "--classes", "0", "--out", target])
        assert code == 2 and err.startswith("error: ") and "Traceback" not in err, err
    finally:
        locked.chmod(0o700)


def test_images_do_not_depend_on_the_batch_size(tmp_path):
    outs = []
    for batch in (1, 3):
        out = tmp_path / f"b{batch}.npz"
        assert main(["sample", "--classes", "1", "2", "7", "--num-iter", "2", "--backend", "reference",
                     "--batch-size", str(batch), "--seed", "5", "--out", str(out)]) == 0
        outs.append(np.load(out))
    # Same random draws; batched products round differently in the last bits only.
    assert np.allclose(outs[0]["tokens"], outs[1]["tokens"], rtol=1e-5, atol=1e-5)
    assert outs[0]["labels"].tolist() == [1, 2, 7]
    model = engine.load("digits", backend="reference")
    want = model.sample_tokens(1, num_iter=2, labels=[2], cfg=model.sampling_defaults["cfg"],
                               temperature=model.sampling_defaults["temperature"],
                               generator=[torch.Generator().manual_seed(6)])
    assert np.allclose(outs[0]["tokens"][1:2], want.numpy(), rtol=1e-5, atol=1e-5)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []   # no temporaries left


def test_fast_on_sample_and_evaluate(tmp_path):
    out = tmp_path / "fast.npz"
    assert main(["sample", "--classes", "1", "2", "--num-iter", "4", "--backend", "reference", "--seed", "3",
                 "--fast", '{"disa": {"upper": 20}}', "--out", str(out)]) == 0
    model = engine.load("digits", backend="reference")
    want = model.sample_tokens(1, num_iter=4, labels=[2], cfg=model.sampling_defaults["cfg"],
                               generator=[torch.Generator().manual_seed(4)], fast={"disa": {"upper": 20}})
    assert np.allclose(np.load(out)["tokens"][1:2], want.numpy(), rtol=1e-5, atol=1e-5)
    from engine.builtin.evaluate import run_sweep
    report = run_sweep("digits", samples_per_class=1, cfgs=[2.0], num_iters=[2], backends=["reference"],
                       log=None, fast="disa+lazy")
    assert report["fast"] == "disa+lazy" and report["results"][0]["fast"] == "disa+lazy"
    assert report["results"][0]["backend"] == "reference fast=disa+lazy"


def test_outputs_have_the_usual_permissions(tmp_path):
    # Written through a temporary file (mkstemp: 0600), renamed into place: the output must get
    # the mode any other file gets under the umask, not stay private to its writer.
    from engine.arguments import write_atomically

    old = os.umask(0o022)
    try:
        out = tmp_path / "x.txt"
        write_atomically(out, lambda tmp: Path(tmp).write_text("x"))
    finally:
        os.umask(old)
    assert out.read_text() == "x" and (out.stat().st_mode & 0o777) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]


def test_every_command_is_listed_without_the_optional_dependencies(tmp_path):
    # A core install (no serving, Ray, scikit-learn or text extras): every command is still in
    # `engine --help`, and running one that needs an extra is one `error:` line naming it, exit 2.
    code = (
        "import sys\n"
        "for m in ('fastapi', 'uvicorn', 'prometheus_client', 'litserve', 'ray', 'sklearn',\n"
        "          'transformers', 'diffusers'):\n"
        "    sys.modules[m] = None\n"
        "from engine.cli import main\n"
        f"sys.exit(main(sys.argv[1:]))\n")
    def engine_cli(*argv):
        return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                              cwd=tmp_path, timeout=300)
    listed = engine_cli("--help")
    assert listed.returncode == 0
    for command in ("sample", "convert", "evaluate", "geneval", "train", "generate", "serve"):
        assert command in listed.stdout
    for argv, extra in ((["serve"], "[serve]"), (["evaluate"], "engine[digits]"),
                        (["generate", "--num-images", "2", "--out", "g", "--ray"], "engine[ray]")):
        proc = engine_cli(*argv)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
        assert extra in lines[0], (argv, lines)


@pytest.mark.parametrize("argv", [
    ["serve", "--threads", "0"], ["serve", "--threads", "-2"], ["evaluate", "--threads", "-1"],
    ["geneval", "--threads", "0"], ["train", "--threads", "-1", "--steps", "1", "--out", "run"],
    ["generate", "--threads", "0", "--num-images", "10", "--out", "g.npz"],
])
def test_threads_below_one_is_one_line(tmp_path, argv):
    # Was: 0 silently meant torch's default, and a negative count a torch RuntimeError traceback.
    proc = subprocess.run([sys.executable, "-m", "engine", *argv], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --threads must be an integer of "
                                                           "at least "), proc.stderr
    assert proc.stderr.count("\n") == 1 and not list(tmp_path.iterdir())


@pytest.mark.parametrize("command", [
    ["sample", "--out", "x.png"], ["generate", "--num-images", "10", "--out", "g.npz"],
    ["serve", "--port", "0", "--no-warmup"],
])
def test_binary_tokens_without_a_bae_is_one_line_on_every_command(tmp_path, command):
    # One check (arguments.check_decoder_arguments) for sample, generate and serve alike.
    import shutil

    from engine.loading import BUILTIN_MODELS

    model = tmp_path / "model"
    shutil.copytree(BUILTIN_MODELS["digits-elm-ar"], model, ignore=shutil.ignore_patterns("bae"))
    proc = subprocess.run([sys.executable, "-m", "engine", command[0], "--checkpoint", str(model), *command[1:]],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(error) == 1, proc.stderr
    assert "this model generates binary tokens: pass --bae" in error[0]
    assert "Traceback" not in proc.stderr and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
