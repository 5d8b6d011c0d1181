"""Sparsity schedules (cubic/linear/exponential/one_shot), mask-update steps, and the prune config checks."""

from __future__ import annotations

import math

import pytest

from bloomray.config import ConfigError, PruneConfig, load_config
from bloomray.prune.schedules import Schedule, is_monotone

S_I, S_F, START, END, EVERY = 0.1, 0.8, 10, 50, 5
BASE = ["train.max_steps=5"]


def sched(kind: str = "cubic", **kw) -> Schedule:
    args = {"initial": S_I, "final": S_F, "start_step": START, "end_step": END, "update_every": EVERY}
    return Schedule(kind, **{**args, **kw})


# --------------------------------------------------------------------------- sparsity_at


@pytest.mark.parametrize("kind", ["cubic", "linear", "exponential", "one_shot"])
def test_zero_before_start(kind: str):
    s = sched(kind)
    assert [s.sparsity_at(t) for t in range(START)] == [0.0] * START


@pytest.mark.parametrize("kind", ["cubic", "linear", "exponential"])
def test_starts_at_initial_at_start_step(kind: str):
    assert sched(kind).sparsity_at(START) == pytest.approx(S_I, abs=1e-12)


@pytest.mark.parametrize("kind", ["cubic", "linear", "exponential", "one_shot"])
def test_reaches_exactly_final_at_end_and_stays(kind: str):
    s = sched(kind)
    assert s.sparsity_at(END) == S_F  # exact, not approximately
    assert all(s.sparsity_at(t) == S_F for t in range(END, END + 200))


def test_cubic_zhu_gupta_midpoint():
    mid = (START + END) // 2
    assert sched("cubic").sparsity_at(mid) == pytest.approx(S_F + (S_I - S_F) * 0.5**3, abs=1e-12)


def test_cubic_follows_the_formula_everywhere():
    s = sched("cubic")
    for t in range(START, END + 1):
        expected = S_F + (S_I - S_F) * (1 - (t - START) / (END - START)) ** 3
        assert s.sparsity_at(t) == pytest.approx(expected, abs=1e-12)


def test_linear_and_exponential_midpoints():
    mid = (START + END) // 2
    assert sched("linear").sparsity_at(mid) == pytest.approx((S_I + S_F) / 2)
    # Geometric in the kept fraction: kept at the midpoint is the geometric mean.
    kept = math.sqrt((1 - S_I) * (1 - S_F))
    assert sched("exponential").sparsity_at(mid) == pytest.approx(1 - kept)


def test_cubic_prunes_early_more_than_linear():
    # The point of the cubic schedule: prune fast while redundancy is high, slowly near the end.
    for t in range(START + 1, END):
        assert sched("cubic").sparsity_at(t) > sched("linear").sparsity_at(t)


@pytest.mark.parametrize("kind", ["cubic", "linear", "exponential"])
@pytest.mark.parametrize("initial", [0.0, 0.3])
def test_monotone_non_decreasing_over_all_steps(kind: str, initial: float):
    s = sched(kind, initial=initial)
    values = [s.sparsity_at(t) for t in range(0, END + 30)]
    assert is_monotone(values)
    assert all(b >= a for a, b in zip(values, values[1:], strict=False))
    assert all(0.0 <= v <= S_F for v in values)


def test_is_monotone_detects_decrease_and_nan():
    assert is_monotone([0.0, 0.1, 0.1, 0.5])
    assert not is_monotone([0.0, 0.5, 0.4])
    assert not is_monotone([0.0, float("nan"), 1.0])


def test_one_shot_jumps_at_start():
    s = sched("one_shot")
    assert s.sparsity_at(START - 1) == 0.0
    assert s.sparsity_at(START) == S_F
    assert s.sparsity_at((START + END) // 2) == S_F
    assert s.steps_with_updates() == [START]


def test_start_equal_end_jumps_to_final():
    s = sched("cubic", start_step=7, end_step=7)
    assert s.sparsity_at(6) == 0.0
    assert s.sparsity_at(7) == S_F
    assert s.steps_with_updates() == [7]


def test_unknown_kind_raises():
    with pytest.raises(ValueError, match="unknown schedule"):
        sched("quadratic").sparsity_at(START + 1)


# --------------------------------------------------------------------------- update steps


def test_update_steps_start_every_and_end():
    s = sched("cubic", start_step=10, end_step=33, update_every=5)
    assert s.steps_with_updates() == [10, 15, 20, 25, 30, 33]
    assert [t for t in range(0, 100) if s.is_update_step(t)] == [10, 15, 20, 25, 30, 33]


@pytest.mark.parametrize("kind", ["cubic", "linear", "exponential"])
def test_no_update_outside_the_window(kind: str):
    s = sched(kind)
    assert not any(s.is_update_step(t) for t in range(0, START))
    assert not any(s.is_update_step(t) for t in range(END + 1, END + 100))
    assert s.is_update_step(START) and s.is_update_step(END)
    assert s.is_update_step(START + EVERY) and not s.is_update_step(START + EVERY + 1)


def test_update_every_one_updates_every_step():
    s = sched("linear", start_step=3, end_step=8, update_every=1)
    assert s.steps_with_updates() == list(range(3, 9))


# --------------------------------------------------------------------------- from_config


def test_from_config_uses_fractions_of_total_steps():
    p = PruneConfig(
        method="magnitude",
        schedule="linear",
        initial_sparsity=0.2,
        final_sparsity=0.6,
        start_fraction=0.1,
        end_fraction=0.7,
        update_every=3,
    )
    s = Schedule.from_config(p, total_steps=200)
    assert s == Schedule("linear", 0.2, 0.6, 20, 140, 3)
    assert s.sparsity_at(140) == 0.6


def test_from_config_rounds_and_clamps_end_to_start():
    s = Schedule.from_config(PruneConfig(start_fraction=0.25, end_fraction=0.5), total_steps=10)
    assert (s.start_step, s.end_step) == (2, 5)  # round(2.5) -> 2 (banker's), round(5.0) -> 5
    # A PruneConfig on its own is not cross-checked; end never lands before start.
    s = Schedule.from_config(PruneConfig(start_fraction=0.6, end_fraction=0.2), total_steps=100)
    assert (s.start_step, s.end_step) == (60, 60)


def test_from_config_defaults_are_cubic():
    s = Schedule.from_config(PruneConfig(), total_steps=100)
    assert (s.kind, s.initial, s.final, s.start_step, s.end_step, s.update_every) == (
        "cubic",
        0.0,
        0.5,
        10,
        70,
        10,
    )


# --------------------------------------------------------------------------- config checks


def test_prune_defaults_are_off_and_valid():
    cfg = load_config(None, BASE)
    assert cfg.prune.method == "none"
    # Inconsistent schedule keys do not matter while pruning is off.
    assert (
        load_config(None, [*BASE, "prune.start_fraction=0.9", "prune.end_fraction=0.1"]).prune.method
        == "none"
    )


def test_end_before_start_fails_naming_both_keys():
    with pytest.raises(ConfigError) as exc:
        load_config(
            None, [*BASE, "prune.method=magnitude", "prune.start_fraction=0.6", "prune.end_fraction=0.2"]
        )
    msg = str(exc.value)
    assert "prune.end_fraction=0.2" in msg
    assert "prune.start_fraction=0.6" in msg


def test_final_below_initial_fails():
    with pytest.raises(ConfigError) as exc:
        load_config(
            None,
            [*BASE, "prune.method=magnitude", "prune.initial_sparsity=0.5", "prune.final_sparsity=0.3"],
        )
    assert "prune.final_sparsity" in str(exc.value) and "prune.initial_sparsity" in str(exc.value)


def test_two_four_needs_half_sparsity():
    with pytest.raises(ConfigError, match=r"prune\.final_sparsity must be 0\.5"):
        load_config(None, [*BASE, "prune.method=2:4", "prune.final_sparsity=0.6"])
    cfg = load_config(None, [*BASE, "prune.method=2:4", "prune.final_sparsity=0.5"])
    assert cfg.prune.method == "2:4"


def test_prune_with_lora_fails():
    lora = [*BASE, "model.lora.enabled=true", "model.path=/some/dir"]
    assert load_config(None, lora).model.lora.enabled  # LoRA alone is fine
    with pytest.raises(ConfigError, match="lora"):
        load_config(None, [*lora, "prune.method=structured"])


@pytest.mark.parametrize(
    "item,key",
    [
        ("prune.final_sparsity=1.0", "prune.final_sparsity"),
        ("prune.update_every=0", "prune.update_every"),
        ("prune.method=random", "prune.method"),
        ("prune.structure=layers", "prune.structure"),
    ],
)
def test_out_of_range_prune_values_name_the_key(item: str, key: str):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [*BASE, item])


def test_unknown_prune_key_suggests_the_close_match():
    with pytest.raises(ConfigError, match="prune.final_sparsity"):
        load_config(None, [*BASE, "prune.final_sparsty=0.5"])


def test_unquoted_two_four_in_yaml_file_is_the_method(tmp_path):
    # YAML 1.1 reads a bare 2:4 as the base-60 integer 124; the config takes it as the method.
    path = tmp_path / "p.yaml"
    path.write_text("train:\n  max_steps: 5\nprune:\n  method: 2:4\n  final_sparsity: 0.5\n")
    assert load_config(path).prune.method == "2:4"


def test_a_schedule_starting_at_zero_prunes_after_the_first_step():

    cfg = load_config(
        None,
        [
            "train.max_steps=16",
            "prune.method=magnitude",
            "prune.schedule=one_shot",
            "prune.start_fraction=0.0",
        ],
    )
    s = Schedule.from_config(cfg.prune, 16)
    assert (
        s.start_step == 1 and s.steps_with_updates() == [1] and s.sparsity_at(1) == cfg.prune.final_sparsity
    )
