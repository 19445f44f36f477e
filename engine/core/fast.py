"""`fast=`: opt-in approximate sampling, parsed and checked once (docs/fast.md).

Values: "exact" (the default: the published tokens), a method name, methods joined by "+"
("disa+lazy"), a dict {method: {parameter: value}} (an empty dict or None for a method's
defaults), or a FastMode. Methods, with their defaults from the papers:

  disa         DiSA, diffusion step annealing (Zhao et al. 2025, github:Qinyu-Allen-Zhao/DiSA):
               the diffusion head of generation step s runs `lower + id(s)` steps, id(s) =
               int((S-1-s) / (S-1) * (upper - lower)) ("linear"; DiSA's `schedule_id`), or
               int((cos(pi s / (S-1)) + 1) / 2 * (upper - lower)) ("cosine"), S the number of
               generation steps; capped at the model's own step count. Defaults upper 50,
               lower 5, schedule "linear" (the paper's MAR setting).
  lazy         LazyMAR (Yan et al., ICCV 2025, github:feihongyan1/LazyMAR): on "lazy" steps the
               encoder runs only the tokens that became known at the previous step (the others'
               keys / values come from a cache), and with CFG the null half is not run: its
               decoder output is the conditional one plus the difference cached at the last full
               step. A step is full when s < start or (s - start) % every == 0. Defaults: the
               paper's start 5, every 9 for MAR's 64 steps, as fractions of the step count
               (start = round(5/64 S), every = max(2, round(9/64 S))) so a short schedule
               keeps the paper's ratio of lazy steps.
  speculative  Speculative Jacobi decoding (Teng et al. 2024, arXiv 2410.01699): a window of
               drafted future tokens verified in one parallel pass; draft x at a position is
               accepted with probability min(1, p(x) / q(x)) (q: the distribution it was drawn
               from, p: the model's), the first rejected one is redrawn from
               normalize(max(0, p - q)): the sampling distribution is kept exactly. Default
               window 16 (the paper's Jacobi window).

Which methods a model takes is its family's (`FAST_MODES` in its module); a method it cannot
use is refused naming the family and the modes it has."""
from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import SamplingError

METHODS = ("disa", "lazy", "speculative")
# Methods whose state lives in the plan's steps, so images of different modes share a batch
# (serving); the others keep per-call caches or windows and the batchers refuse them.
BATCHABLE = ("disa",)
DISA_SCHEDULES = ("linear", "cosine")
DEFAULTS = {
    "disa": {"upper": 50, "lower": 5, "schedule": "linear"},
    "lazy": {"start": None, "every": None},          # None: the paper's 5 / 9 of 64 steps, scaled
    "speculative": {"window": 16},
}
MAX_WINDOW = 4096
MAX_STEPS = 65536


def _int(method: str, name: str, value, low: int, high: int, none_ok: bool = False):
    if value is None and none_ok:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise SamplingError(f"fast: {method} {name} must be an integer in [{low}, {high}], got {value!r}")
    return int(value)


@dataclass(frozen=True)
class DiSA:
    upper: int = 50
    lower: int = 5
    schedule: str = "linear"

    def steps(self, step: int, num_steps: int, model_steps: int) -> int:
        """Diffusion steps of generation step `step` of `num_steps` (DiSA's schedule_id + lower),
        capped at the model's own `model_steps`."""
        span = self.upper - self.lower
        last = num_steps - 1
        if last <= 0:
            index = span
        elif self.schedule == "linear":
            index = int((last - step) / last * span)
        else:
            index = int((math.cos(math.pi * step / last) + 1) / 2 * span)
        return max(1, min(self.lower + index, model_steps))


@dataclass(frozen=True)
class Lazy:
    start: int | None = None
    every: int | None = None

    def fresh(self, step: int, num_steps: int) -> bool:
        """Whether generation step `step` of `num_steps` runs the full transformer (LazyMAR's
        global_force_fresh)."""
        start = round(5 * num_steps / 64) if self.start is None else self.start
        every = max(2, round(9 * num_steps / 64)) if self.every is None else self.every
        return step < start or (step - start) % every == 0


@dataclass(frozen=True)
class Speculative:
    window: int = 16


@dataclass(frozen=True)
class FastMode:
    """A parsed `fast=` value: each method's parameters, or None when it is off."""
    disa: DiSA | None = None
    lazy: Lazy | None = None
    speculative: Speculative | None = None

    @property
    def methods(self) -> tuple:
        return tuple(m for m in METHODS if getattr(self, m) is not None)

    @property
    def exact(self) -> bool:
        return not self.methods

    @property
    def name(self) -> str:
        return "+".join(self.methods) or "exact"

    @property
    def spec(self):
        """The JSON-able form that parses back to this mode: the name when every method has its
        defaults ("disa+lazy"), else a dict of each method's parameters."""
        import dataclasses

        params = {m: dataclasses.asdict(getattr(self, m)) for m in self.methods}
        if all(params[m] == dataclasses.asdict(type(getattr(self, m))()) for m in params):
            return self.name
        return params

    def __str__(self) -> str:
        return self.name


EXACT = FastMode()


def _method(name: str, params) -> object:
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise SamplingError(f"fast: the parameters of {name} must be a dict, got {type(params).__name__}")
    unknown = sorted(set(params) - set(DEFAULTS[name]))
    if unknown:
        raise SamplingError(f"fast: {name} has no parameter {unknown[0]!r}; it takes "
                            f"{', '.join(sorted(DEFAULTS[name]))}")
    p = {**DEFAULTS[name], **params}
    if name == "disa":
        upper = _int(name, "upper", p["upper"], 1, MAX_STEPS)
        lower = _int(name, "lower", p["lower"], 1, MAX_STEPS)
        if lower > upper:
            raise SamplingError(f"fast: disa lower ({lower}) must not exceed upper ({upper})")
        if p["schedule"] not in DISA_SCHEDULES:
            raise SamplingError(f"fast: disa schedule must be one of {DISA_SCHEDULES}, got {p['schedule']!r}")
        return DiSA(upper, lower, p["schedule"])
    if name == "lazy":
        return Lazy(_int(name, "start", p["start"], 0, MAX_STEPS, True),
                    _int(name, "every", p["every"], 1, MAX_STEPS, True))
    return Speculative(_int(name, "window", p["window"], 1, MAX_WINDOW))


def parse_fast(value) -> FastMode:
    """A FastMode from any accepted `fast=` value; SamplingError naming `fast` otherwise."""
    if value is None:
        return EXACT
    if isinstance(value, FastMode):
        return value
    if isinstance(value, str):
        names = [part.strip().lower() for part in value.split("+")]
        if names == ["exact"]:
            return EXACT
        bad = [n for n in names if n not in METHODS]
        if bad:
            raise SamplingError(f"fast: unknown mode {bad[0]!r}; expected 'exact', one of {', '.join(METHODS)} "
                                "or several joined by '+' (e.g. 'disa+lazy')")
        value = {n: None for n in names}
    if not isinstance(value, dict):
        raise SamplingError(f"fast must be a string such as 'disa+lazy', a dict {{method: parameters}} or "
                            f"None, got {type(value).__name__}")
    bad = [k for k in value if k not in METHODS]
    if bad:
        raise SamplingError(f"fast: unknown mode {bad[0]!r}; expected one of {', '.join(METHODS)}")
    return FastMode(**{name: _method(name, params) for name, params in value.items()})


def fast_setting(value, family: str, supported: tuple):
    """A `fast` setting checked for `family` (resolve_settings), kept in its JSON-able form."""
    return check_fast(value, family, supported).spec


def check_fast(value, family: str, supported: tuple) -> FastMode:
    """`value` parsed, and refused when it asks for a method `family` does not have."""
    mode = parse_fast(value)
    missing = [m for m in mode.methods if m not in supported]
    if missing:
        has = ", ".join(("exact",) + tuple(supported))
        raise SamplingError(f"fast: {family} models cannot use {missing[0]!r}; the fast modes of {family} "
                            f"are: {has}")
    return mode


class FastModes:
    """The fast= part of a loaded model (every family's model class inherits it)."""
    # The fast modes (engine.core.fast) the family takes: each family's module sets its own.
    fast_modes: tuple = ()

    def check_fast(self, fast):
        """`fast=` parsed, refused when it names a mode this family does not have."""
        return check_fast(fast, self.family, self.fast_modes)

    def fast_setting(self, fast):
        """The `fast` setting of resolve_settings: checked, in its JSON-able form (a name or a dict)."""
        return check_fast(fast, self.family, self.fast_modes).spec
