"""Every family through every shared path: engine.generate, `engine sample`, `engine generate`
(one process, torchrun with 2 ranks, Ray), the Scheduler's iteration-level / continuous batching
(its invariant with many concurrent mixed requests) and `engine serve`'s HTTP app; and that no
module outside engine/families spells a family's name."""
import ast
import base64
import io
import json
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
from engine.families import families
from engine.serving import Request, Scheduler

pytestmark = pytest.mark.usefixtures("one_thread")

# Built-in models, one per family (Fluid: digits-text), with settings that keep them quick.
BUILTIN = {"digits": dict(num_iter=4), "digits-causal": {}, "digits-elm-ar": {}, "digits-elm-mlm": dict(num_iter=4),
           "digits-ctf": {}, "digits-text": dict(num_iter=4)}
# The scheduler's invariant runs these: the AR families (KV-cache slots), MLM, CTF's two stages.
BATCHED = ["digits-elm-ar", "digits-elm-mlm", "digits-ctf", "digits-causal"]


@pytest.fixture(scope="module")
def models():
    return {}


def load(models, name):
    if name not in models:
        models[name] = engine.load(name, num_sampling_steps="10" if name in ("digits", "digits-causal", "digits-text")
                                   else None)
    return models[name]


def test_builtin_models_cover_every_family(models):
    assert {load(models, name).family for name in BUILTIN} == set(families())


@pytest.mark.parametrize("name", BUILTIN)
def test_every_model_implements_the_protocol(models, name):
    from engine.core.protocol import CONDITIONINGS, DECODERS

    model = load(models, name)
    assert model.conditioning in CONDITIONINGS and model.decoder in DECODERS
    for method in ("resolve_settings", "generate_images", "sample_tokens", "decode", "image_shape", "batcher"):
        assert callable(getattr(model, method)), method
    if model.conditioning == "class":
        assert model.num_classes >= 1
    else:
        assert len(model.text_shape) == 2 and callable(model.texts_for)
    settings = model.resolve_settings()
    assert settings == model.resolve_settings(**settings)      # resolving is idempotent
    with pytest.raises(engine.SamplingError, match="no_such_setting"):
        model.resolve_settings(no_such_setting=1)


@pytest.mark.parametrize("name", BUILTIN)
def test_generate_every_family(models, name):
    model = load(models, name)
    kw = dict(prompts=["a 3 to the left of a 7", "two fives"]) if model.conditioning == "text" else dict(labels=[3, 7])
    images = engine.generate(model, generator=[torch.Generator().manual_seed(i) for i in range(2)], output_type="np",
                             **kw, **BUILTIN[name])
    h, w, c = model.image_shape(bae=getattr(model, "bae", None))
    assert images.shape == (2, h, w, c) and np.isfinite(images).all() and 0 <= images.min() <= images.max() <= 1


def _solo(model, label, seed, settings):
    """Image `seed`'s tokens as the family's batch sampler gives them alone (engine.generate's)."""
    settings = model.resolve_settings(**settings)
    return model.sample_tokens(1, labels=None if label is None else [label],
                               generator=[torch.Generator().manual_seed(seed)], **settings)


@pytest.mark.parametrize("name", BATCHED)
def test_scheduler_invariant_mixed_concurrent_requests(models, name):
    """14 concurrent requests (classes, unconditional, cfg on and off, temperatures, n 1-3) through
    8 images in flight, so images join and leave between steps at different positions: every
    image equals its solo run (discrete tokens token for token; continuous within 1e-4)."""
    model = load(models, name)
    cfgs = [1.0, 2.0, 3.5]
    requests = [Request(label=None if i % 7 == 6 else i % 10, n=1 + i % 3, cfg=cfgs[i % 3],
                        temperature=[1.0, 0.8][i % 2], seed=100 * i) for i in range(14)]
    with Scheduler(model, max_batch_images=8, admit_wait=0.02) as sched:
        futures = [sched.submit(r) for r in requests]
        results = [f.result(300) for f in futures]
    assert sched.counts["ok"] == len(requests)
    for request, result in zip(requests, results):
        for i in range(request.n):
            want = _solo(model, request.label, request.seed + i, dict(cfg=request.cfg, temperature=request.temperature))
            got = result.tokens[i:i + 1]
            if want.dtype == torch.int64:
                assert torch.equal(got, want), (request, i)
            else:
                assert (got - want).abs().max() <= 1e-4 * max(1.0, want.abs().max()), (request, i)
    # The decoded images are engine.generate's.
    r = requests[1]
    want = engine.generate(model, [r.label], generator=[torch.Generator().manual_seed(r.seed)], output_type="np",
                           cfg=r.cfg, temperature=r.temperature)
    assert np.abs(results[1].images("np")[:1] - want).max() <= 1e-4


@pytest.mark.parametrize("name", BATCHED + ["digits"])
def test_a_failing_image_fails_only_its_request_every_family(models, name):
    """A step that fails whenever one request's image is in it (after every image given drew
    from its generator): the scheduler retries by groups, then image by image, from the
    generators' states before the step; that request fails, every other image equals its solo
    run (the batchers step any subset of the images in flight)."""
    from engine.serving import WorkerError

    model = load(models, name)
    bad_seed = 301
    requests = [Request(label=i % 10, n=2, cfg=[1.0, 2.0][i % 2], seed=100 * i, num_iter=BUILTIN[name].get("num_iter"))
                for i in range(1, 5)]
    sched = Scheduler(model, max_batch_images=8, admit_wait=0.05, start=False)
    real = sched.batcher.step

    def step(images):
        if any(im.generator.initial_seed() == bad_seed for im in images):
            for im in images:
                torch.rand(4, generator=im.generator)
            raise RuntimeError("injected fault")
        return real(images)
    sched.batcher.step = step
    with sched.start():
        futures = [sched.submit(r) for r in requests]
        with pytest.raises(WorkerError, match="injected fault"):
            futures[2].result(300)
        results = {i: futures[i].result(300) for i in (0, 1, 3)}
    for i, result in results.items():
        r = requests[i]
        for k in range(r.n):
            want = _solo(model, r.label, r.seed + k, dict(cfg=r.cfg, num_iter=r.num_iter))
            got = result.tokens[k:k + 1]
            if want.dtype == torch.int64:
                assert torch.equal(got, want), (i, k)
            else:
                assert (got - want).abs().max() <= 1e-4 * max(1.0, want.abs().max()), (i, k)
    if hasattr(sched.batcher, "pool"):
        assert sched.batcher.pool.used == 0       # the failed request's rows were released


def test_slots_are_reused_and_compacted(models):
    """A KV-cache slot pool after images of different lengths left: rows stay [0, used), owners
    track their moved rows, and a long run of requests never grows it past the batch."""
    model = load(models, "digits-elm-ar")
    with Scheduler(model, max_batch_images=3, admit_wait=0) as sched:
        futures = [sched.submit(Request(label=i % 10, cfg=[1.0, 2.0][i % 2], seed=i)) for i in range(9)]
        [f.result(120) for f in futures]
        pool = sched.batcher.pool
    assert pool.used == 0 and pool.cache.k.shape[1] <= 8


@pytest.mark.parametrize("name", BUILTIN)
def test_sample_command_every_family(models, name, tmp_path):
    out = tmp_path / "x.npz"
    model = load(models, name)
    cond = ["--prompt", "two fives"] if model.conditioning == "text" else ["--classes", "1", "2"]
    extra = ["--num-iter", str(BUILTIN[name]["num_iter"])] if "num_iter" in BUILTIN[name] else []
    assert main(["sample", "--checkpoint", name, *cond, *extra, "--out", str(out)]) == 0
    with np.load(out) as data:
        assert data["images"].shape[0] == (1 if model.conditioning == "text" else 2)
        assert "tokens" in data.files


def _generate_argv(name, out, num_images=4):
    model_extra = ["--num-iter", str(BUILTIN[name]["num_iter"])] if "num_iter" in BUILTIN[name] else []
    return ["generate", "--checkpoint", name, "--num-images", str(num_images), "--group-size", "2", "--seed", "5",
            *model_extra, "--out", str(out), "--no-metrics"]


@pytest.mark.parametrize("name", [n for n in BUILTIN if n != "digits-text"])
def test_generate_command_every_class_family(models, name, tmp_path):
    """`engine generate` writes every class-conditional family's .npz (the ADM layout); the images
    are engine.generate's for image i's generator."""
    out = tmp_path / "g.npz"
    model = load(models, name)
    assert main(_generate_argv(name, out) + ["--classes", "1", "2"]) == 0
    with np.load(out) as data:
        arr, labels = data["arr_0"], data["labels"]
    h, w, c = model.image_shape(bae=getattr(model, "bae", None))
    assert arr.dtype == np.uint8 and arr.shape == (4, h, w, c) and labels.tolist() == [1, 1, 2, 2]


def test_generate_command_text_family(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("two fives\na 3 to the left of a 7\n")
    out = tmp_path / "t.npz"
    assert main(_generate_argv("digits-text", out) + ["--prompts-file", str(prompts)]) == 0
    with np.load(out) as data:
        assert data["arr_0"].shape[0] == 4 and data["labels"].tolist() == [0, 0, 1, 1]


CLASSES = ["--classes", "1", "2", "3"]


def _one_process(name, tmp_path):
    out = tmp_path / "one.npz"
    assert main(_generate_argv(name, out, 6) + CLASSES) == 0
    return out


@pytest.mark.parametrize("name", BATCHED)
def test_generate_torchrun_two_ranks_every_family(name, tmp_path):
    """torchrun with 2 ranks writes the same bytes as one process, for every family beyond MAR
    (MAR's own: tests/distributed/test_distributed.py)."""
    one = _one_process(name, tmp_path)
    two = tmp_path / "two.npz"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "engine"]
    proc = subprocess.run(launcher + _generate_argv(name, two, 6) + CLASSES, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    with np.load(one) as a, np.load(two) as b:
        assert a["arr_0"].tobytes() == b["arr_0"].tobytes() and str(a["spec"]) == str(b["spec"])


def test_generate_ray_every_family(tmp_path):
    """Ray Data workers write the same bytes as one process, for every family beyond MAR (MAR's
    own: tests/distributed/test_distributed.py); one Ray runtime for all of them."""
    ray = pytest.importorskip("ray")
    from engine.distributed import generate_ray

    ones = {}
    for name in BATCHED:
        (tmp_path / name).mkdir()
        ones[name] = _one_process(name, tmp_path / name)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        rays = {name: generate_ray(6, tmp_path / name / "ray.npz", checkpoint=name, num_workers=2, seed=5,
                                   group_size=2, classes=[1, 2, 3], device="cpu", threads=1, progress=False,
                                   **BUILTIN[name])   # the settings _generate_argv gives the one process
                for name in BATCHED}
    finally:
        ray.shutdown()
    for name in BATCHED:
        with np.load(ones[name]) as a, np.load(rays[name]) as c:
            assert a["arr_0"].tobytes() == c["arr_0"].tobytes() and str(a["spec"]) == str(c["spec"]), name


def test_generate_torchrun_text_family(tmp_path):
    """The text-to-image family through torchrun (2 ranks): the same bytes as one process."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("two fives\na 3 to the left of a 7\n")
    argv = lambda out: _generate_argv("digits-text", out) + ["--prompts-file", str(prompts)]  # noqa: E731
    one, two = tmp_path / "one.npz", tmp_path / "two.npz"
    assert main(argv(one)) == 0
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "engine"]
    proc = subprocess.run(launcher + argv(two), capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    with np.load(one) as a, np.load(two) as b:
        assert a["arr_0"].tobytes() == b["arr_0"].tobytes() and str(a["spec"]) == str(b["spec"])


@pytest.mark.parametrize("name", BUILTIN)
def test_serve_every_family(models, name):
    """The HTTP app answers a generation for every family with PNGs of the model's size."""
    from fastapi.testclient import TestClient
    from PIL import Image

    from engine.serving.http import create_app

    model = load(models, name)
    body = {"n": 2, "seed": 3, **BUILTIN[name]}
    body.update({"prompt": "two fives"} if model.conditioning == "text" else {"class_label": 4})
    with TestClient(create_app(model=model, max_batch_images=4)) as client:
        deadline = time.monotonic() + 120
        while client.get("/health").status_code != 200:   # loads and warms up in the background
            assert time.monotonic() < deadline, "never healthy"
            time.sleep(0.05)
        response = client.post("/v1/images/generations", json=body)
        assert response.status_code == 200, response.text
        data = response.json()["data"]
    h, w, c = model.image_shape(bae=getattr(model, "bae", None))
    image = Image.open(io.BytesIO(base64.b64decode(data[0]["b64_json"])))
    assert len(data) == 2 and image.size == (w, h)


@pytest.mark.parametrize("name", BUILTIN)
def test_stream_partial_images_every_family(models, name):
    """stream=true for every family: the partial images are the decodes of the batcher's
    `preview` at evenly spaced steps (PNGs of the model's size, each different), and the
    completed image is the non-streamed answer's PNG, byte for byte."""
    from fastapi.testclient import TestClient
    from PIL import Image

    from engine.serving.http import create_app

    model = load(models, name)
    body = {"seed": 11, **BUILTIN[name]}
    body.update({"prompt": "two fives"} if model.conditioning == "text" else {"class_label": 5})
    with TestClient(create_app(model=model, max_batch_images=4, warmup=False)) as client:
        deadline = time.monotonic() + 120
        while client.get("/health").status_code != 200:
            assert time.monotonic() < deadline, "never healthy"
            time.sleep(0.05)
        plain = client.post("/v1/images/generations", json=body).json()["data"][0]["b64_json"]
        with client.stream("POST", "/v1/images/generations", json={**body, "stream": True, "partial_images": 2}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            text = "".join(r.iter_text())
    events = [(block.split("\n")[0][len("event: "):], json.loads(block.split("\n")[1][len("data: "):]))
              for block in text.strip().split("\n\n")]
    kinds = [kind for kind, _ in events]
    assert kinds == ["image_generation.partial_image"] * 2 + ["image_generation.completed"], kinds
    assert all(kind == data["type"] for kind, data in events)
    assert [data["partial_image_index"] for _, data in events[:2]] == [0, 1]
    assert events[-1][1]["b64_json"] == plain
    h, w, c = model.image_shape(bae=getattr(model, "bae", None))
    for _, data in events:
        assert Image.open(io.BytesIO(base64.b64decode(data["b64_json"]))).size == (w, h)
    assert len({data["b64_json"] for _, data in events}) == 3


def test_no_module_outside_the_families_spells_a_family_name():
    """Shared code reaches a family through its protocol: a string constant equal to a family's
    name appears only under engine/families (docstrings and messages may mention them in text)."""
    names = set(families())
    root = Path(engine.__file__).parent
    found = []
    for path in root.rglob("*.py"):
        if "families" in path.relative_to(root).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
                found.append(f"{path.relative_to(root)}:{node.lineno} {node.value!r}")
    assert not found, found


def _png(item) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))))


@pytest.mark.parametrize("name", ["digits-elm-ar", "digits-elm-mlm"])
def test_litserve_adapter_serves_discrete_families(models, name):
    pytest.importorskip("litserve")
    from fastapi.testclient import TestClient
    from litserve.utils import wrap_litserve_start

    from engine.serving.litserve_api import EngineLitAPI, server as lit_server

    model = load(models, name)
    server = lit_server(EngineLitAPI(name, warmup=False), accelerator="cpu", timeout=120)
    with wrap_litserve_start(server) as server, TestClient(server.app) as client:
        r = client.post("/v1/images/generations", json={"class_label": 6, "seed": 3, "n": 2})
        assert r.status_code == 200, r.text
        for i, item in enumerate(r.json()["data"]):
            want = engine.generate(model, [6], generator=[torch.Generator().manual_seed(3 + i)], output_type="pil")
            assert np.abs(_png(item).astype(int) - np.asarray(want[0]).astype(int)).max() <= 1


def test_ray_serve_adapter_serves_an_ar_family(models):
    ray = pytest.importorskip("ray")
    serve = pytest.importorskip("ray.serve")
    from engine.serving.ray_serve import app

    model = load(models, "digits-ctf")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        serve.start(proxy_location="Disabled")
        handle = serve.run(app("digits-ctf", ray_actor_options={"num_cpus": 1}, threads=1, warmup=False),
                           name="engine-ctf-test", route_prefix=None)
        calls = [handle.generate.remote({"class_label": i, "seed": 20 + i}) for i in range(3)]
        for i, call in enumerate(calls):
            item = call.result(timeout_s=120)["data"][0]
            want = engine.generate(model, [i], generator=[torch.Generator().manual_seed(20 + i)], output_type="pil")
            assert np.abs(_png(item).astype(int) - np.asarray(want[0]).astype(int)).max() <= 1
    finally:
        serve.shutdown()
        ray.shutdown()


DATA = Path(__file__).resolve().parents[1] / "data"
# Published-format checkpoints of the tests' data: (argv after --checkpoint, what engine.load needs).
PUBLISHED = {
    "elm-ar": (["--family", "elm-ar", "--config", "n_head=4", "--config", "block_size=16",
                "--bae", str(DATA / "elm" / "binaryae_ema.th")],
               dict(path=DATA / "elm" / "ck_a.pth", family="elm-ar", n_head=4, block_size=16)),
    "elm-mlm": (["--family", "elm-mlm", "--config", "n_head=4", "--config", "block_size=16",
                 "--bae", str(DATA / "elm" / "binaryae_ema.th")],
                dict(path=DATA / "elm_mlm" / "ck_a.pth", family="elm-mlm", n_head=4, block_size=16)),
}


@pytest.mark.parametrize("family", PUBLISHED)
def test_published_checkpoints_through_sample_generate_and_serve(family, tmp_path):
    """A bare published state dict (ELM's) with the configuration it does not record given as
    --config and its BAE as --bae: `sample`, `generate` and the served app give engine.generate's
    images."""
    from fastapi.testclient import TestClient

    from engine.serving.http import create_app

    argv, load = PUBLISHED[family]
    path = load.pop("path")
    model = engine.load(path, **load)
    model.bae = engine.load_bae(DATA / "elm" / "binaryae_ema.th")
    want = engine.generate(model, [1, 2], generator=[torch.Generator().manual_seed(i) for i in range(2)],
                           output_type="np")
    out = tmp_path / "s.npz"
    assert main(["sample", "--checkpoint", str(path), *argv, "--classes", "1", "2", "--out", str(out)]) == 0
    with np.load(out) as data:
        assert np.abs(data["images"] - want).max() <= 1e-6
    out = tmp_path / "g.npz"
    assert main(["generate", "--checkpoint", str(path), *argv, "--classes", "1", "--num-images", "2",
                 "--out", str(out), "--no-metrics"]) == 0
    with np.load(out) as data:
        assert data["arr_0"].shape == (2, *want.shape[1:]) and json_spec(data)["args"]["config"]
    with TestClient(create_app(model=model, max_batch_images=4)) as client:
        deadline = time.monotonic() + 120
        while client.get("/health").status_code != 200:
            assert time.monotonic() < deadline, "never healthy"
            time.sleep(0.05)
        r = client.post("/v1/images/generations", json={"class_label": 2, "seed": 1})
        assert r.status_code == 200, r.text
    assert np.abs(_png(r.json()["data"][0]) / 255.0 - want[1]).max() <= 1 / 255 + 1e-6


def json_spec(data) -> dict:
    import json

    return json.loads(str(data["spec"]))
