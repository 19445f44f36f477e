"""`engine generate` (engine/distributed): one process vs torchrun ranks vs Ray give the same
bytes, a SIGKILLed job resumes to the same file, the merge refuses what is not this job's, and
user errors are one line with exit code 2 and no file. The built-in digits model with 2 MAR
steps and 10 diffusion steps keeps every run to a few seconds."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.cli import main
from engine.distributed import Metrics, compute_metrics, image_seed
from engine.distributed.job import groups, protocol_conditions, work_items
from engine.distributed.store import PartStore

N = 20
FAST = ["--num-iter", "2", "--steps", "10", "--seed", "3", "--group-size", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def argv(out, *extra, metrics=False):
    return ["generate", "--num-images", str(N), *FAST, "--out", str(out), *extra] + ([] if metrics else ["--no-metrics"])


def torchrun(*args, nproc=2, script=None):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    target = [str(script)] if script else ["-m", "engine"]
    return launcher + target + list(args)


def load(path):
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, batch 4 (parts of two groups), metrics on, PNGs: the file every other way
    of running must reproduce byte for byte."""
    d = tmp_path_factory.mktemp("reference")
    out = d / "ref.npz"
    code = main(argv(out, "--batch-size", "4", "--png-dir", str(d / "png"), "--metrics-json",
                     str(d / "metrics.json"), metrics=True))
    assert code == 0
    return {"dir": d, "out": out, "data": load(out)}


def test_output_format_labels_and_pngs(reference):
    data = reference["data"]
    assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (N, 16, 16, 1)
    # MAR's evaluation protocol: every class equally often, in class order.
    assert data["labels"].tolist() == [c for c in range(10) for _ in range(N // 10)]
    spec = json.loads(str(data["spec"]))
    assert spec["args"]["num_images"] == N and spec["args"]["group_size"] == 2
    assert spec["env"]["threads"] == 1
    from PIL import Image
    pngs = sorted((reference["dir"] / "png").iterdir())
    assert [p.name for p in pngs] == [f"{i:05d}.png" for i in range(N)]
    for i in (0, 7, N - 1):
        assert np.array_equal(np.asarray(Image.open(pngs[i])), data["arr_0"][i, ..., 0])
    assert not (reference["dir"] / "ref.npz.parts").exists()   # merged, then removed
    assert [p.name for p in reference["dir"].iterdir() if p.name.startswith(".")] == []
    # The default metrics: the digits classifier, offline.
    m = json.loads((reference["dir"] / "metrics.json").read_text())
    assert m["features"] == "digits" and m["count"] == N and 0 <= m["accuracy"] <= 1 and m["fd"] > 0


def test_images_are_the_api_images(reference):
    """Image i is engine.generate's image for its label with a generator seeded image_seed(3, i),
    in its canonical group (here: images 6 and 7 are one call)."""
    import engine
    from engine.images import to_uint8

    model = engine.load("digits", num_sampling_steps="10")
    labels = reference["data"]["labels"][6:8].tolist()
    gens = [torch.Generator().manual_seed(image_seed(3, i)) for i in (6, 7)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        want = engine.generate(model, labels, num_iter=2, generator=gens, output_type="np")
    finally:
        torch.set_num_threads(threads)
    assert np.array_equal(to_uint8(want), reference["data"]["arr_0"][6:8])


def test_torchrun_two_ranks_batch_7_is_byte_identical(reference, tmp_path):
    out = tmp_path / "tr.npz"
    proc = subprocess.run(torchrun(*argv(out, "--batch-size", "7")), capture_output=True, text=True,
                          timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = load(out)
    assert got["arr_0"].tobytes() == reference["data"]["arr_0"].tobytes()
    assert np.array_equal(got["labels"], reference["data"]["labels"])
    assert str(got["spec"]) == str(reference["data"]["spec"])


SLOW = """import sys, time
import engine.distributed.store as store
write = store.PartStore.write_part
def slow(self, *args, **kwargs):
    path = write(self, *args, **kwargs)
    time.sleep(0.4)
    return path
store.PartStore.write_part = slow
from engine.cli import main
sys.exit(main(sys.argv[1:]))
"""


def descendants(pid: int) -> list[int]:
    """Every live descendant of `pid` (read from /proc)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_job(proc) -> None:
    """SIGKILL the job's process groups: torchrun's own, and each rank's (torchrun starts every
    rank in a session of its own, so killing torchrun's group alone would orphan the ranks)."""
    groups = {_pgid(p) for p in descendants(proc.pid)} - {None} | {proc.pid}
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _pgid(pid: int):
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def test_sigkilled_job_resumes_to_the_same_file(reference, tmp_path, monkeypatch):
    """torchrun (2 ranks) slowed down after every part, SIGKILLed (every process group of the
    job) once parts exist; the same command run again makes only what is missing and writes the
    same bytes."""
    script = tmp_path / "slow_generate.py"
    script.write_text(SLOW)
    out = tmp_path / "k.npz"
    args = argv(out, "--batch-size", "2")
    proc = subprocess.Popen(torchrun(*args, script=script), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=ENV, start_new_session=True)
    store = PartStore(out)
    deadline = time.monotonic() + 180
    try:
        while len(store.parts()) < 3:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no parts appeared"
            time.sleep(0.02)
    finally:
        kill_job(proc)
        proc.communicate()
    time.sleep(0.2)
    before = store.parts()
    assert 3 <= len(before) < N // 2 and not out.exists()
    # Rerun the same arguments (no slow-down; here in this process: a resume needs neither the
    # same process count nor the same batch size). Only the missing images are made.
    made = []
    from engine.distributed.worker import GroupSampler
    sample = GroupSampler.sample

    def counting(self, job, start, stop):
        made.extend(range(start, stop))
        return sample(self, job, start, stop)
    monkeypatch.setattr(GroupSampler, "sample", counting)
    assert main(argv(out, "--batch-size", "6")) == 0
    done = {i for a, b, _ in before for i in range(a, b)}
    assert sorted(made) == sorted(set(range(N)) - done)     # nothing made twice, nothing skipped
    got = load(out)
    assert got["arr_0"].tobytes() == reference["data"]["arr_0"].tobytes()
    assert np.array_equal(got["labels"], reference["data"]["labels"])
    assert not store.dir.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".k")]


def test_ray_data_gives_the_same_images(reference, tmp_path):
    ray = pytest.importorskip("ray")
    from engine.distributed import generate_ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        out = generate_ray(N, tmp_path / "ray.npz", num_workers=2, num_iter=2, steps="10", seed=3,
                           group_size=2, batch_size=6, device="cpu", threads=1, progress=False)
    finally:
        ray.shutdown()
    got = load(out)
    assert got["arr_0"].tobytes() == reference["data"]["arr_0"].tobytes()
    assert np.array_equal(got["labels"], reference["data"]["labels"])
    assert str(got["spec"]) == str(reference["data"]["spec"])


# The merge and the parts -------------------------------------------------------------------
@pytest.fixture()
def kept(tmp_path):
    """A finished job whose parts were kept (its --out removed, as if the merge had not run)."""
    out = tmp_path / "kept.npz"
    assert main(argv(out, "--batch-size", "4", "--keep-parts")) == 0
    data = load(out)
    out.unlink()
    return out, data


def test_rerun_merges_kept_parts_without_sampling(kept, monkeypatch, capsys):
    out, data = kept
    from engine.distributed.worker import GroupSampler

    monkeypatch.setattr(GroupSampler, "sample", lambda *a, **k: pytest.fail("sampled again"))
    assert main(argv(out)) == 0
    assert load(out)["arr_0"].tobytes() == data["arr_0"].tobytes()
    assert main(argv(out)) == 0                        # complete: nothing to do
    assert "is complete" in capsys.readouterr().out


def test_merge_refuses_a_doubled_or_missing_index(kept, capsys):
    out, _ = kept
    store = PartStore(out)
    parts = store.parts()
    # A foreign part covering images already present: doubled.
    a, b, path = parts[0]
    with np.load(path) as p:
        arrays = {k: p[k] for k in p.files}
    meta = json.loads(str(arrays["meta"]))
    meta.update(start=a + 2, stop=b + 2)
    np.savez(store.part_path(a + 2, b + 2), **{**arrays, "meta": np.array(json.dumps(meta))})
    code = main(argv(out))
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert not out.exists()
    store.part_path(a + 2, b + 2).unlink()
    # A missing part is made again by the rerun, not silently skipped.
    parts[-1][2].unlink()
    assert main(argv(out)) == 0 and load(out)["arr_0"].shape[0] == N


def test_merge_refuses_a_damaged_part(kept, capsys):
    out, _ = kept
    store = PartStore(out)
    path = store.parts()[1][2]
    with np.load(path) as p:
        arrays = {k: p[k] for k in p.files}
    arrays["images"] = arrays["images"].copy()
    arrays["images"][0, 0, 0, 0] ^= 1
    np.savez(path, **arrays)
    assert main(argv(out)) == 2
    err = capsys.readouterr().err
    assert "checksum" in err and err.count("\n") == 1 and not out.exists()


def test_mismatched_resume_is_refused(kept, capsys):
    out, _ = kept
    before = sorted(p.name for p in out.parent.rglob("*"))
    code = main(["generate", "--num-images", str(N), "--num-iter", "2", "--steps", "10", "--seed", "4",
                 "--group-size", "2", "--out", str(out), "--no-metrics"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "made with other arguments" in err and "args.seed: 3 -> 4" in err
    assert sorted(p.name for p in out.parent.rglob("*")) == before


def test_existing_output_of_other_arguments_is_refused(reference, capsys, tmp_path):
    out = tmp_path / "o.npz"
    out.write_bytes(reference["out"].read_bytes())
    assert main(argv(out, "--cfg", "3")) == 2
    assert "exists and was made with other arguments" in capsys.readouterr().err


# User errors: one line, exit code 2, nothing written -------------------------------------------
@pytest.mark.parametrize("extra,message", [
    (["--num-images", "0"], "--num-images must be an integer of at least 1"),
    (["--classes", "3", "10"], "label 10 is out of range"),
    (["--num-images", "15"], "not a multiple of the 10 classes"),
    (["--group-size", "0"], "--group-size must be an integer of at least 1"),
    (["--seed", "-1"], "--seed must be"),
    (["--cfg-schedule", "linear", "--temperature", "0"], "temperature must be"),
    (["--out", "{tmp}/x.png"], "ending in .npz"),
    (["--out", "{tmp}/no/such/dir/x.npz"], "does not exist"),
    (["--out", "/proc/x.npz"], "cannot write"),
    (["--prompts-file", "{tmp}/p.txt"], "class-conditional model"),
    (["--inception-weights", "{tmp}/none.pth"], "file not found"),
    (["--fid-ref", "{tmp}/none.npz"], "file not found"),
    (["--checkpoint", "/nonexistent.pth"], "checkpoint not found"),
])
def test_user_errors_are_one_line(tmp_path, capsys, extra, message):
    (tmp_path / "p.txt").write_text("a cat\n")
    extra = [x.replace("{tmp}", str(tmp_path)) for x in extra]
    args = argv(tmp_path / "x.npz", metrics=True)
    if "--num-images" in extra:
        i = args.index("--num-images")
        del args[i:i + 2]
    if "--out" in extra:
        i = args.index("--out")
        del args[i:i + 2]
    before = sorted(tmp_path.iterdir())
    assert main(args + extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert sorted(tmp_path.iterdir()) == before   # nothing written, not even a parts directory


def test_user_error_in_a_fresh_process(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "engine", *argv(tmp_path / "x.npz", "--num-images", "0")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr and not list(tmp_path.iterdir())


# Metrics --------------------------------------------------------------------------------------
def test_digits_fd_against_a_reference_file(reference):
    m = compute_metrics(reference["out"], fid_ref=reference["out"])
    assert m["features"] == "digits" and abs(m["fd"]) < 1e-3 and "accuracy" in m   # same images: 0


def test_inception_metrics_go_through_torch_fidelity_with_the_local_file(reference, tmp_path, monkeypatch):
    """The glue: torch-fidelity gets the local weights file, no cache, no download, uint8 RGB
    images (grey repeated). A stand-in module plays torch-fidelity (its torchvision cannot load
    on this CPU-only torch)."""
    import types

    weights = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    weights.write_bytes(b"local")
    seen = {}

    def calculate_metrics(**kw):
        seen.update(kw)
        return {"inception_score_mean": 1.5, "inception_score_std": 0.1, "frechet_inception_distance": 7.0}
    monkeypatch.setitem(sys.modules, "torch_fidelity", types.SimpleNamespace(calculate_metrics=calculate_metrics))
    m = Metrics(fid_ref=reference["out"], inception_weights=weights)
    m.check((16, 16, 1))
    result = m.compute(reference["out"], log=None)
    assert result["fid"] == 7.0 and result["inception_score"] == 1.5
    assert seen["feature_extractor_weights_path"] == str(weights) and seen["cache"] is False
    assert seen["datasets_download"] is False and seen["feature_extractor"] == "inception-v3-compat"
    x = seen["input1"][3]
    assert x.dtype == torch.uint8 and x.shape == (3, 16, 16) and len(seen["input2"]) == N
    assert torch.equal(x[0], torch.from_numpy(reference["data"]["arr_0"][3, ..., 0]))


def test_without_torch_fidelity_the_error_says_so(tmp_path, monkeypatch):
    from engine import EngineError

    weights = tmp_path / "w.pth"
    weights.write_bytes(b"local")
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)   # import fails
    with pytest.raises(EngineError, match="torch-fidelity"):
        Metrics(inception_weights=weights).check((16, 16, 1))
    with pytest.raises(EngineError, match="needs --inception-weights"):
        Metrics(fid_ref=tmp_path / "r.npz").check((32, 32, 3))


# The layout ------------------------------------------------------------------------------------
def test_groups_items_seeds_and_protocol():
    assert groups(5, 2) == [(0, 2), (2, 4), (4, 5)]
    assert work_items([0, 1, 2, 4, 5], 2, 11, 2) == [(0, 4), (4, 6), (8, 11)]
    assert protocol_conditions(6, 3, "classes") == [0, 0, 1, 1, 2, 2]
    seeds = {image_seed(s, i) for s in range(3) for i in range(100)}
    assert len(seeds) == 300 and all(0 <= x < 2 ** 63 for x in seeds)
    assert image_seed(0, 1) != image_seed(1, 0)


# Text-to-image ---------------------------------------------------------------------------------
def test_prompts_file_on_a_tiny_fluid(tmp_path):
    """--prompts-file: each prompt N / P times in file order (blank lines skipped), `labels` =
    prompt indices, the `prompts` array; the images are the API's for the same seeds and group."""
    pytest.importorskip("transformers")
    pytest.importorskip("diffusers")
    import engine
    import fluid_assets as fa
    from helpers import random_fluid
    from engine.images import to_uint8
    from engine.loading import save_engine_dir
    from engine.families.fluid import FluidModel

    module = random_fluid(0, caption_channels=fa.T5_D_MODEL, max_length=6, vae_embed_dim=fa.VAE_LATENT_CHANNELS,
                          img_size=8, vae_stride=fa.VAE_SCALE, num_sampling_steps="5")
    ckpt = save_engine_dir(module.state_dict(), FluidModel(module, backend="reference").config, tmp_path / "fluid")
    t5, sd = fa.make_t5_dir(tmp_path), fa.make_vae_dir(tmp_path)
    (tmp_path / "prompts.txt").write_text("a cat\n\ntwo dogs\n")
    common = ["generate", "--checkpoint", str(ckpt), "--text-encoder", str(t5), "--vae", str(sd),
              "--prompts-file", str(tmp_path / "prompts.txt"), "--num-images", "4", "--num-iter", "2",
              "--cfg", "2", "--group-size", "2", "--backend", "reference", "--no-metrics"]
    assert main(common + ["--batch-size", "4", "--out", str(tmp_path / "a.npz")]) == 0
    a = load(tmp_path / "a.npz")
    assert a["arr_0"].shape == (4, 8, 8, 3)
    assert a["labels"].tolist() == [0, 0, 1, 1] and a["prompts"].tolist() == ["a cat", "two dogs"]
    model = engine.load(ckpt, backend="reference")
    enc = engine.load_text_encoder(t5, max_length=model.config.max_length)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        want = engine.generate(model, prompts=["two dogs", "two dogs"], text_encoder=enc,
                               vae=engine.load_vae(sd), num_iter=2, cfg=2.0, output_type="np",
                               generator=[torch.Generator().manual_seed(image_seed(0, i)) for i in (2, 3)])
    finally:
        torch.set_num_threads(threads)
    assert np.array_equal(to_uint8(want), a["arr_0"][2:4])
