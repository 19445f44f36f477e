"""Every bad argument of engine.load / engine.generate, for every family, is refused with an engine
error whose message names the argument (CTF's per-stage settings name their stage too)."""
import functools

import pytest
import torch

import engine
from engine.core.errors import EngineError
from engine.loading import BUILTIN_MODELS

BAD_SETTINGS = [
    ("labels", [-1]), ("labels", [10]), ("labels", ["a"]), ("labels", [1.5]), ("labels", []),
    ("labels", "x"), ("labels", [True]), ("labels", torch.tensor([[1]])), ("labels", torch.tensor(3)),
    ("labels", {1: 2}), ("labels", {1, 2}), ("labels", (i for i in [1])), ("labels", [1] * 70000),
    ("num_images", 0), ("num_images", -1), ("num_images", 1.5), ("num_images", "2"), ("num_images", True),
    ("num_iter", 0), ("num_iter", -3), ("num_iter", 1.5), ("num_iter", "8"), ("num_iter", 10 ** 9),
    ("cfg", float("nan")), ("cfg", float("inf")), ("cfg", "x"), ("cfg", -1e40), ("cfg", [1, 2, 3]),
    ("cfg_schedule", "bogus"), ("cfg_schedule", 3),
    ("temperature", -1), ("temperature", float("nan")), ("temperature", "x"), ("temperature", 1e39),
    ("generator", "x"), ("generator", 3), ("generator", [torch.Generator()] * 5),
    ("output_type", "bogus"), ("output_type", None),
    ("height", 0), ("height", 17), ("height", "x"), ("height", 10 ** 6), ("width", 7),
    ("top_k", 0), ("top_k", -1), ("top_k", 1.5), ("top_k", "x"),
    ("top_p", 0), ("top_p", 1.5), ("top_p", -0.1), ("top_p", "x"), ("top_p", float("nan")),
    ("prompts", [3]), ("prompts", [None]), ("prompts", []),
    ("vae", "nope.ckpt"), ("vae", 3), ("bae", "nope.th"), ("bae", 3),
]

CTF_STAGES = [
    ({"cfg": (2, 2, 2)}, "cfg: a per-stage setting is a tuple (stage 1, stage 2), got 3 entries"),
    ({"temperature": (1, 1, 1)}, "temperature: a per-stage setting is a tuple (stage 1, stage 2), got 3"),
    ({"top_k": (5,)}, "top_k: a per-stage setting is a tuple (stage 1, stage 2), got 1 entries"),
    ({"top_p": (0.5, 0.5, 0.5)}, "top_p: a per-stage setting"),
    ({"cfg": (2, "a")}, "cfg (stage 2) must be a finite number"),
    ({"cfg": (float("nan"), 2)}, "cfg (stage 1) must be a finite number"),
    ({"temperature": (1, -1)}, "temperature (stage 2) must be a finite number > 0"),
    ({"temperature": ((1, 2), 1)}, "temperature (stage 1) has 2 entries for 1 images"),
    ({"top_k": (0, 5)}, "top_k (stage 1) must be at least 1"),
    ({"top_k": (5, 2.5)}, "top_k (stage 2) must be a positive integer"),
    ({"top_p": (1, 1.5)}, "top_p (stage 2) must be a number in (0, 1]"),
]

BAD_LOADS = [
    ("backend", "bogus"), ("backend", 3), ("device", "bogus"), ("device", 3), ("precision", "fp8"),
    ("precision", 3), ("ema", "yes"), ("cuda_graphs", "x"), ("family", "nope"), ("family", 3),
    ("num_sampling_steps", "x"), ("num_sampling_steps", 0), ("num_sampling_steps", "ddim0"),
]


@functools.lru_cache(maxsize=None)
def model(name):
    return engine.load(name)


def base_call(m) -> dict:
    if m.conditioning == "text":
        return {"prompts": ["a 3"]}
    return {"labels": [3]} if m.num_classes else {"num_images": 1}


@pytest.mark.parametrize("name", sorted(BUILTIN_MODELS))
def test_every_bad_setting_names_its_argument(name):
    m = model(name)
    for argument, value in BAD_SETTINGS:
        call = base_call(m)
        call.pop("labels" if argument == "num_images" else "num_images" if argument == "labels" else "", None)
        call[argument] = value
        with pytest.raises(EngineError) as err:
            engine.generate(m, **call)
        message = str(err.value)
        named = argument.removesuffix("s") if argument in ("labels", "prompts") else argument
        assert named in message, (name, argument, value, message)
        assert len(message) < 600, message   # one readable message, never a dump


@pytest.mark.parametrize("settings, message", CTF_STAGES)
def test_ctf_per_stage_errors_name_the_setting_and_stage(settings, message):
    m = model("digits-ctf")
    with pytest.raises(EngineError, match=message.replace("(", r"\(").replace(")", r"\)")):
        engine.generate(m, labels=[3], **settings)
    generator = torch.Generator().manual_seed(0)
    if "entries for" in message:   # a per-image list: the batcher's images take one value each
        return
    resolved = {**m.resolve_settings(), **settings}
    with pytest.raises(EngineError, match=message.replace("(", r"\(").replace(")", r"\)")):
        m.resolve_settings(**settings) and m.batcher(2).add(label=3, settings=resolved, generator=generator)


@pytest.mark.parametrize("name", sorted(BUILTIN_MODELS))
def test_every_bad_load_argument_names_itself(name):
    for argument, value in BAD_LOADS:
        with pytest.raises(EngineError) as err:
            engine.load(name, **{argument: value})
        message = str(err.value)
        assert argument in message, (name, argument, value, message)


def test_a_family_that_contradicts_the_directory_says_both():
    with pytest.raises(EngineError, match="family='mar' but the directory holds a 'ctf' model"):
        engine.load("digits-ctf", family="mar")


@pytest.mark.parametrize("name", sorted(BUILTIN_MODELS))
def test_a_setting_the_family_lacks_names_the_argument_not_the_config_file(name):
    # engine.load's keywords are the caller's: the error says which one, never blames config.json.
    with pytest.raises(EngineError) as err:
        engine.load(name, colour=3)
    assert "no setting 'colour'" in str(err.value) and "config.json" not in str(err.value)
    if not hasattr(engine.load(name).config, "num_sampling_steps"):
        with pytest.raises(EngineError, match=r"num_sampling_steps \(--steps\) is a diffusion-head "
                                              "setting") as err:
            engine.load(name, num_sampling_steps="10")
        assert "config.json" not in str(err.value)


def test_steps_on_a_model_without_a_diffusion_head_is_one_cli_line(capsys):
    from engine.cli import main

    assert main(["sample", "--checkpoint", "digits-elm-ar", "--steps", "10", "--out", "x.png"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: num_sampling_steps (--steps) is a diffusion-head setting; the elm-ar "
                   "model draws its tokens without a diffusion head"]
