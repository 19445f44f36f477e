"""fast= parsed once (engine/core/fast.py): values, defaults, refusals naming the argument, and the
DiSA / LazyMAR schedules against re-statements of the published code; the plan carries them."""
import math

import pytest

from engine.core.errors import SamplingError
from engine.core.fast import DiSA, EXACT, FastMode, Lazy, Speculative, check_fast, parse_fast
from engine.core.plan import build_plan


def test_values_parse_to_one_fast_mode():
    assert parse_fast(None) is EXACT and parse_fast("exact") is EXACT and EXACT.exact and EXACT.name == "exact"
    assert parse_fast("disa") == FastMode(disa=DiSA())
    both = parse_fast("disa+lazy")
    assert both == parse_fast(" Lazy + DISA ") == parse_fast({"lazy": None, "disa": {}})
    assert both.methods == ("disa", "lazy") and both.name == "disa+lazy" and both.spec == "disa+lazy"
    custom = parse_fast({"disa": {"upper": 20, "schedule": "cosine"}, "speculative": {"window": 4}})
    assert custom.disa == DiSA(20, 5, "cosine") and custom.speculative == Speculative(4)
    assert parse_fast(custom.spec) == custom and parse_fast(custom) is custom
    assert custom.spec == {"disa": {"upper": 20, "lower": 5, "schedule": "cosine"}, "speculative": {"window": 4}}


@pytest.mark.parametrize("value,message", [
    ("fastest", "fast: unknown mode 'fastest'"),
    ("disa+", "fast: unknown mode ''"),
    (3, "fast must be a string"),
    ({"warp": {}}, "fast: unknown mode 'warp'"),
    ({"disa": 5}, "fast: the parameters of disa must be a dict"),
    ({"disa": {"steps": 5}}, "fast: disa has no parameter 'steps'; it takes lower, schedule, upper"),
    ({"disa": {"lower": 0}}, r"fast: disa lower must be an integer in \[1, 65536\]"),
    ({"disa": {"upper": 4}}, r"fast: disa lower \(5\) must not exceed upper \(4\)"),
    ({"disa": {"upper": 2.5}}, "fast: disa upper must be an integer"),
    ({"disa": {"schedule": "cos"}}, "fast: disa schedule must be one of"),
    ({"lazy": {"every": 0}}, "fast: lazy every must be an integer"),
    ({"speculative": {"window": True}}, "fast: speculative window must be an integer"),
])
def test_bad_values_are_refused_naming_fast(value, message):
    with pytest.raises(SamplingError, match=message):
        parse_fast(value)


def test_a_family_refuses_modes_it_does_not_have_naming_itself_and_its_modes():
    assert check_fast("disa", "mar", ("disa", "lazy")).disa is not None
    with pytest.raises(SamplingError, match="fast: elm-mlm models cannot use 'disa'; the fast modes of elm-mlm "
                                            "are: exact$"):
        check_fast("disa", "elm-mlm", ())
    with pytest.raises(SamplingError, match="cannot use 'speculative'.*exact, disa, lazy"):
        check_fast("disa+speculative", "mar", ("disa", "lazy"))


def disa_restated(step, num_iter, upper, lower, strategy):
    """DiSA's MAR_DiSA/models/diffloss.py: gen_diffusion = [steps for steps in range(lower,
    upper + 1)], schedule_id from the strategy, upper_step = ar_num_iter - 1."""
    gen_diffusion = list(range(lower, upper + 1))
    upper_step = num_iter - 1
    if strategy == "linear":
        schedule_id = int((upper_step - step) / upper_step * (len(gen_diffusion) - 1))
    else:
        schedule_id = int((math.cos(math.pi * step / upper_step) + 1) / 2 * (len(gen_diffusion) - 1))
    return gen_diffusion[schedule_id]


@pytest.mark.parametrize("num_iter", [2, 8, 64, 256])
@pytest.mark.parametrize("upper,lower,strategy", [(50, 5, "linear"), (25, 5, "linear"), (100, 5, "cosine"),
                                                   (9, 9, "linear")])
def test_disa_schedule_is_the_published_one(num_iter, upper, lower, strategy):
    disa = DiSA(upper, lower, strategy)
    for step in range(num_iter):
        assert disa.steps(step, num_iter, 1000) == disa_restated(step, num_iter, upper, lower, strategy)
    assert disa.steps(0, num_iter, 1000) == upper and disa.steps(num_iter - 1, num_iter, 1000) == lower
    assert disa.steps(0, num_iter, 20) == min(upper, 20)          # never more than the model's own steps
    assert DiSA().steps(0, 1, 100) == 50                          # one generation step: the upper count


def test_lazy_schedule_is_lazymar_at_64_steps_and_scales_with_the_step_count():
    def force_fresh(step, start=5, fresh_t=9):   # LazyMAR's MAR.global_force_fresh
        return step < start or (step - start) % fresh_t == 0
    assert [Lazy().fresh(s, 64) for s in range(64)] == [force_fresh(s) for s in range(64)]
    assert [Lazy(3, 4).fresh(s, 16) for s in range(16)] == [force_fresh(s, 3, 4) for s in range(16)]
    assert [Lazy().fresh(s, 8) for s in range(8)] == [force_fresh(s, 1, 2) for s in range(8)]


def test_the_plan_carries_head_steps_and_lazy_steps_exact_plans_unchanged():
    exact = build_plan(2, 8, 16, 2.0)
    assert exact is build_plan(2, 8, 16, 2.0, fast=parse_fast("exact"), model_steps=50)
    assert all(s.head_steps is None and not s.lazy and not s.refresh for s in exact.steps)
    assert exact.shape_key == (2, 8, 16, True)
    plan = build_plan(2, 8, 16, 2.0, fast=parse_fast("disa+lazy"), model_steps=50)
    assert [s.head_steps for s in plan.steps] == [None, 43, 37, 30, 24, 17, 11, 5]   # 50 is the model's own
    assert [s.lazy for s in plan.steps] == [False, False, True, False, True, False, True, False]
    assert [s.refresh for s in plan.steps] == [False, True, False, True, False, True, False, False]
    assert plan.shape_key != exact.shape_key and plan.use_cfg
    assert [(s.unknown_before, s.unknown_after) for s in plan.steps] == \
        [(s.unknown_before, s.unknown_after) for s in exact.steps]
    with pytest.raises(SamplingError, match="model_steps"):
        build_plan(2, 8, 16, 2.0, fast=parse_fast("disa"))
