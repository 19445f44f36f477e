"""The data of the built-in text-to-image model "digits-text": real scikit-learn digits composed
onto a 16 x 32 canvas, with captions from a fixed grammar, and its tiny T5 text encoder.

The canvas has a left slot (columns 0-15) and a right slot (columns 16-31); each holds a real
16 x 16 digit (engine.builtin.digits, the same train / held-out split as "digits") or nothing (the
background, -1). Captions, a digit d written as a numeral or a word ("7" / "seven") at random:

    single object   "a {d}"                       one slot holds d, the other is empty
                    "a {d} on the left" / "... on the right"
    two objects     "a {d1} and a {d2}"           d1 != d2, both present, either order
    position        "a {d1} to the left of a {d2}" / "a {d1} to the right of a {d2}"  (d1 != d2)
    counting        "two {d}s"                    both slots d ("two 7s", "two sevens", "two sixes")

"an" is accepted for "a" before eight ("an 8", "an eight"). `parse_prompt` inverts the grammar,
so any prompt of it can be scored (engine.builtin.geneval), and an unknown word is refused with the
vocabulary (never an image of noise).

The text encoder is a real transformers T5EncoderModel (2 layers, d_model 64) frozen after a
seeded initialisation, with a word-level Hugging Face tokenizer over exactly the grammar's words;
it is saved next to the model (engine/builtin/assets/digits-text/text_encoder) and read by
engine.load_text_encoder like any T5 directory. Frozen and random is enough: a random
transformer keeps the identity and order of the words, and the model's own text aligner learns
to read them.
"""
from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.errors import SamplingError

HEIGHT, WIDTH, SLOT = 16, 32, 16
CATEGORIES = ("single object", "two objects", "counting", "position")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PLURAL_WORDS = tuple("sixes" if w == "six" else w + "s" for w in NUMBER_WORDS)
GRAMMAR_WORDS = ("a", "an", "and", "on", "the", "left", "right", "to", "of", "two")
VOCABULARY = tuple(dict.fromkeys(
    GRAMMAR_WORDS + NUMBER_WORDS + PLURAL_WORDS + tuple(str(d) for d in range(10))
    + tuple(f"{d}s" for d in range(10))))
MAX_LENGTH = 12   # the longest caption has 8 words + </s>
T5_SIZES = dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4)
T5_SEED = 0


@dataclass(frozen=True)
class Scene:
    """What a caption asks for: the category, and the digit each slot must hold (None: empty)
    or, where the caption leaves the side open, the digits in any order (`either`)."""
    category: str
    left: int | None = None
    right: int | None = None
    either: tuple = ()          # single object without a side: (d,); two objects: sorted (d1, d2)


# Captions ------------------------------------------------------------------------------------
def _digit(d: int, rng: random.Random) -> str:
    return str(d) if rng.random() < 0.5 else NUMBER_WORDS[d]


def _article(word: str, rng: random.Random) -> str:
    return "an" if word in ("8", "eight") and rng.random() < 0.5 else "a"


def _object(d: int, rng: random.Random) -> str:
    word = _digit(d, rng)
    return f"{_article(word, rng)} {word}"


def caption_for(scene: Scene, rng: random.Random, form: str | None = None) -> str:
    """A caption of the grammar describing `scene` (random spelling; `form` picks among the
    equivalent phrasings: "plain" / "side" for single objects, "left of" / "right of" for
    positions, "ab" / "ba" for two objects)."""
    if scene.category == "single object":
        if form == "plain" or (form is None and scene.either):
            return _object(scene.either[0] if scene.either else (scene.left if scene.left is not None
                                                                 else scene.right), rng)
        side = "left" if scene.left is not None else "right"
        return f"{_object(scene.left if scene.left is not None else scene.right, rng)} on the {side}"
    if scene.category == "two objects":
        a, b = scene.either
        if form == "ba":
            a, b = b, a
        return f"{_object(a, rng)} and {_object(b, rng)}"
    if scene.category == "counting":
        d = scene.left
        return f"two {PLURAL_WORDS[d] if rng.random() < 0.5 else f'{d}s'}"
    if scene.category == "position":
        if form == "right of":
            return f"{_object(scene.right, rng)} to the right of {_object(scene.left, rng)}"
        return f"{_object(scene.left, rng)} to the left of {_object(scene.right, rng)}"
    raise ValueError(scene.category)


def random_scene(rng: random.Random, category: str | None = None) -> tuple[Scene, str]:
    """A scene of `category` (uniform over CATEGORIES if None) and one caption of it."""
    category = category or rng.choice(CATEGORIES)
    d1, d2 = rng.sample(range(10), 2)
    if category == "single object":
        form = rng.choice(("plain", "left", "right"))
        if form == "plain":
            return Scene(category, either=(d1,)), caption_for(Scene(category, either=(d1,)), rng)
        scene = Scene(category, left=d1) if form == "left" else Scene(category, right=d1)
        return scene, caption_for(scene, rng)
    if category == "two objects":
        scene = Scene(category, either=tuple(sorted((d1, d2))))
        return scene, caption_for(scene, rng, form=rng.choice(("ab", "ba")))
    if category == "counting":
        return Scene(category, left=d1, right=d1), caption_for(Scene(category, left=d1, right=d1), rng)
    scene = Scene(category, left=d1, right=d2)
    return scene, caption_for(scene, rng, form=rng.choice(("left of", "right of")))


def layout(scene: Scene, rng: random.Random) -> tuple[int | None, int | None]:
    """The (left, right) digits of one image of `scene` (sides left open are drawn at random)."""
    if scene.category == "single object" and scene.either:
        return (scene.either[0], None) if rng.random() < 0.5 else (None, scene.either[0])
    if scene.category == "two objects":
        a, b = scene.either
        return (a, b) if rng.random() < 0.5 else (b, a)
    return scene.left, scene.right


def words_of(prompt: str) -> list[str]:
    return prompt.lower().split()


def check_vocabulary(prompt: str) -> None:
    from ..decoders.text import unknown_words_error

    unknown = [w for w in words_of(prompt) if w not in VOCABULARY]
    if unknown:
        raise unknown_words_error(prompt, unknown, VOCABULARY)


def _number(word: str) -> int | None:
    if word in NUMBER_WORDS:
        return NUMBER_WORDS.index(word)
    if len(word) == 1 and word.isdigit():
        return int(word)
    return None


def _plural(word: str) -> int | None:
    if word in PLURAL_WORDS:
        return PLURAL_WORDS.index(word)
    if len(word) == 2 and word[0].isdigit() and word[1] == "s":
        return int(word[0])
    return None


def parse_prompt(prompt: str) -> Scene:
    """The scene a prompt of the grammar asks for; SamplingError for anything else."""
    check_vocabulary(prompt)
    w = words_of(prompt)

    def obj(i):   # "a d" / "an d" at position i -> digit
        if i + 1 < len(w) and w[i] in ("a", "an") and _number(w[i + 1]) is not None:
            return _number(w[i + 1])
        return None

    n = len(w)
    if n == 2 and obj(0) is not None:
        return Scene("single object", either=(obj(0),))
    if n == 5 and obj(0) is not None and w[2:4] == ["on", "the"] and w[4] in ("left", "right"):
        return Scene("single object", **{w[4]: obj(0)})
    if n == 5 and obj(0) is not None and w[2] == "and" and obj(3) is not None:
        return Scene("two objects", either=tuple(sorted((obj(0), obj(3)))))
    if n == 2 and w[0] == "two" and _plural(w[1]) is not None:
        return Scene("counting", left=_plural(w[1]), right=_plural(w[1]))
    if n == 8 and obj(0) is not None and w[2:4] == ["to", "the"] and w[4] in ("left", "right") \
            and w[5] == "of" and obj(6) is not None:
        a, b = obj(0), obj(6)
        return Scene("position", left=a, right=b) if w[4] == "left" else Scene("position", left=b, right=a)
    raise SamplingError(f"prompt {prompt!r} is not in the digits-text grammar: 'a 7', 'a 7 on the "
                        "left', 'a 3 and a 5', 'a 3 to the left of a 7', 'two 4s' (digits as "
                        "numerals or words)")


def all_prompts() -> list[str]:
    """Every caption of the grammar (every spelling), for tests and for precomputing texts."""
    out = []
    spell = lambda d: (str(d), NUMBER_WORDS[d])  # noqa: E731
    arts = lambda word: ("a", "an") if word in ("8", "eight") else ("a",)  # noqa: E731
    objs = lambda d: [f"{a} {s}" for s in spell(d) for a in arts(s)]  # noqa: E731
    for d in range(10):
        for o in objs(d):
            out += [o, f"{o} on the left", f"{o} on the right"]
        out += [f"two {PLURAL_WORDS[d]}", f"two {d}s"]
    for d1, d2 in itertools.permutations(range(10), 2):
        for o1, o2 in itertools.product(objs(d1), objs(d2)):
            out += [f"{o1} and {o2}", f"{o1} to the left of {o2}", f"{o1} to the right of {o2}"]
    return out


# Images --------------------------------------------------------------------------------------
def compose(left: torch.Tensor | None, right: torch.Tensor | None) -> torch.Tensor:
    """[1, 16, 32] canvas in [-1, 1] from two [1, 16, 16] digits (None: an empty slot)."""
    canvas = torch.full((1, HEIGHT, WIDTH), -1.0)
    if left is not None:
        canvas[:, :, :SLOT] = left
    if right is not None:
        canvas[:, :, SLOT:] = right
    return canvas


class CanvasSampler:
    """Canvases with captions from one split of the real digits. Every draw comes from the
    `random.Random` passed in, so a caller that seeds one per batch (training: per step) gets
    the same batches after a restart."""

    def __init__(self, split: str = "train", mention_order: bool = False):
        """`mention_order`: lay out "a A and a B" with A on the left (the built-in model's
        training data; either order is correct for the caption, see engine/builtin/train_text.py)
        instead of either way at random."""
        from .digits import load_split

        self.mention_order = mention_order
        self.images, labels = load_split(split, size=SLOT)
        self.by_class = [torch.nonzero(labels == d).flatten().tolist() for d in range(10)]

    def digit(self, d: int | None, rng: random.Random) -> torch.Tensor | None:
        return None if d is None else self.images[rng.choice(self.by_class[d])]

    def batch(self, n: int, rng: random.Random, category: str | None = None):
        """(canvases [n, 1, 16, 32], captions, scenes)."""
        canvases, captions, scenes = [], [], []
        for _ in range(n):
            scene, caption = random_scene(rng, category)
            left, right = layout(scene, rng)
            if self.mention_order and scene.category == "two objects":
                left, right = [d for d in map(_number, words_of(caption)) if d is not None]
            canvases.append(compose(self.digit(left, rng), self.digit(right, rng)))
            captions.append(caption)
            scenes.append(scene)
        return torch.stack(canvases), captions, scenes


# The text encoder ----------------------------------------------------------------------------
def write_text_encoder(out_dir, seed: int = T5_SEED) -> Path:
    """OUT/config.json, model.safetensors, tokenizer.json (+ tokenizer_config.json ...)."""
    from ..decoders.text import random_t5_encoder, word_tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = word_tokenizer(VOCABULARY)
    random_t5_encoder(len(tokenizer), seed, **T5_SIZES).save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return out
