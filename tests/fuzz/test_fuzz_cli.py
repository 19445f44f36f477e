"""Fuzzing the command line (`engine sample`, `convert`, `generate`) with hypothesis: argument
lists mixing every option with valid, edge and nonsense values. Exit 0 with a complete output
file, or exit 2 with one `error:` line (argparse's usage + error for malformed options) and no
output file at all: never a traceback, another exit code, or a partial file."""
import contextlib
import io
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st
from PIL import Image

from engine import cli
from engine.loading import BUILTIN_MODELS
from fuzz_targets import SEEDS, no_hang

EXAMPLES = int(os.environ.get("ENGINE_FUZZ_EXAMPLES", "50"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))

junk = st.sampled_from(["", "-1", "0", "1e400", "nan", "inf", "x", "2", "1.5", "999999999999", "--", "-",
                        "\x00", "ü", "1,2", "[1]", "None"])
small = st.sampled_from(["1", "2", "3"])
OPTIONS = {
    "--checkpoint": st.sampled_from(sorted(BUILTIN_MODELS)) | st.sampled_from(["nope", str(SEEDS["mar.pth"]), "/"]),
    "--family": st.sampled_from(["mar", "elm-ar", "bogus"]),
    "--config": st.sampled_from(["n_head=2", "x", "=1", "img_size=-3", "class_num=[1]", "n_head=nan"]),
    "--classes": st.lists(st.sampled_from(["0", "3", "9", "10", "-1", "a"]), min_size=1, max_size=3),
    "--prompt": st.sampled_from(["a 3", "", "x" * 300]),
    "--num-iter": small | junk, "--cfg": small | junk, "--temperature": small | junk,
    "--top-k": small | junk, "--top-p": st.sampled_from(["0.5", "1"]) | junk,
    "--cfg-schedule": st.sampled_from(["linear", "constant", "bogus"]),
    "--height": st.sampled_from(["16", "32", "17"]) | junk, "--width": st.sampled_from(["16", "32"]) | junk,
    "--per-class": small | junk, "--seed": small | junk, "--batch-size": small | junk,
    "--steps": st.sampled_from(["10", "ddim5", "10,5", "ddim0"]) | junk,
    "--backend": st.sampled_from(["auto", "reference", "native", "bogus"]),
    "--device": st.sampled_from(["cpu", "cuda", "bogus"]),
    "--precision": st.sampled_from(["fp32", "bf16", "fp16", "fp8"]),
    "--vae": st.sampled_from(["nope.ckpt", str(SEEDS["mar.pth"])]),
    "--bae": st.sampled_from(["nope.th", str(SEEDS["bae.safetensors"])]),
}
GENERATE_ONLY = {"--num-images": small | junk, "--group-size": small | junk, "--threads": small | junk}
SAMPLE_ONLY = ("--classes", "--prompt", "--per-class", "--seed", "--batch-size")


@st.composite
def sample_argv(draw, tmp):
    names = draw(st.lists(st.sampled_from(sorted(OPTIONS)), max_size=4, unique=True))
    argv = ["sample"]
    for name in names:
        value = draw(OPTIONS[name])
        argv += [name, *value] if isinstance(value, list) else [name, value]
    suffix = draw(st.sampled_from([".png", ".npz", ".jpg", ".txt", ""]))
    out = tmp / f"out{suffix}"
    return argv + ["--out", str(out)], out


def run(argv) -> tuple[int, str]:
    stderr, stdout = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout), no_hang():
        try:
            code = cli.main(argv)
        except SystemExit as done:   # argparse
            code = done.code
    return code, stderr.getvalue()


def check_outcome(code, err, out):
    assert "Traceback" not in err, err
    if code == 0:
        event("ran")
        assert out.exists()
        if out.suffix == ".png":
            Image.open(out).verify()
        elif out.suffix == ".npz":
            with np.load(out) as arrays:
                assert np.isfinite(arrays[arrays.files[0]]).all()
        return
    event("refused")
    assert code == 2, (code, err)
    lines = [line for line in err.strip().splitlines() if not line.startswith("sampling")]
    assert lines and (lines[-1].startswith("error: ") or lines[-1].startswith("engine ")), err
    assert len(lines[-1]) < 2000
    assert not out.exists(), "a failed run left an output file"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "a temporary file was left"


@FUZZ
@given(data=st.data())
def test_sample_arguments(tmp_path_factory, data):
    tmp = tmp_path_factory.mktemp("cli")
    argv, out = data.draw(sample_argv(tmp))
    code, err = run(argv)
    check_outcome(code, err, out)


@FUZZ
@given(data=st.data())
def test_generate_arguments(tmp_path_factory, data):
    tmp = tmp_path_factory.mktemp("gen")
    names = data.draw(st.lists(st.sampled_from(sorted(set(OPTIONS) - set(SAMPLE_ONLY)) + sorted(GENERATE_ONLY)),
                               max_size=3, unique=True))
    argv = ["generate", "--num-images", "2", "--no-metrics"]
    for name in names:
        value = data.draw({**OPTIONS, **GENERATE_ONLY}[name])
        argv += [name, *value] if isinstance(value, list) else [name, value]
    out = tmp / "gen.npz"
    code, err = run(argv + ["--out", str(out)])
    assert "Traceback" not in err, err
    assert code in (0, 2), (code, err)
    if code == 0:
        with np.load(out) as arrays:
            assert arrays["arr_0"].dtype == np.uint8 and len(arrays["arr_0"]) >= 1
    else:
        assert not out.exists()


@pytest.mark.parametrize("extra", [["--force"], []])
@FUZZ
@given(data=st.data())
def test_convert_arguments(tmp_path_factory, data, extra):
    tmp = tmp_path_factory.mktemp("conv")
    src = data.draw(st.sampled_from([str(SEEDS["mar.pth"]), str(SEEDS["elm.pth"]), "nope.pth", str(tmp)]))
    target = data.draw(st.sampled_from(["out", "missing/out", "existing", "file"]))
    (tmp / "existing").mkdir()
    (tmp / "existing" / "mine").write_text("x")
    (tmp / "file").write_text("x")
    options = data.draw(st.lists(st.sampled_from(["--no-ema", "--family=elm-ar", "--family=mar", "--config=n_head=2",
                                                  "--config=bogus=1"]), max_size=3, unique=True))
    code, err = run(["convert", src, str(tmp / target), *options, *extra])
    assert "Traceback" not in err and code in (0, 2), (code, err)
    if code == 2:
        assert err.strip().splitlines()[-1].startswith(("error: ", "engine ")), err
        assert (tmp / "existing" / "mine").read_text() == "x"
        assert not (tmp / "out").exists() and not (tmp / "missing").exists()
    leftovers = [p.name for p in tmp.iterdir() if p.name.startswith(".")]
    assert not leftovers, leftovers
