"""Multi-objective search without Ray: the config's rules, the Pareto front over any number of
objectives, the 2-D hypervolume, and the sampler a search gets."""

from __future__ import annotations

import typing

import pytest

from bloomray.config import OBJECTIVES, ConfigError, load_config
from bloomray.config.schema import Objective
from bloomray.tune.objectives import front_hypervolume, hypervolume_2d, modes, pareto_rows, sampler

MO = ["tune.search=optuna", "tune.scheduler=fifo", "tune.objectives=[eval_loss, latency_ms]"]


def cfg(*overrides: str):
    return load_config("tune-tiny-cpu", list(overrides))


def test_every_objective_has_a_direction():
    assert set(OBJECTIVES) == set(typing.get_args(Objective))
    assert modes(cfg(*MO)) == ["min", "min"]
    assert modes(cfg(*MO[:2], "tune.objectives=[eval_loss, sparsity]")) == ["min", "max"]


@pytest.mark.parametrize(
    ("items", "match"),
    [
        (["tune.objectives=[eval_loss]"], "two or more different metrics"),
        (["tune.objectives=[eval_loss, eval_loss]"], "two or more different metrics"),
        (["tune.objectives=[size_mb, latency_ms]"], "must include tune.metric=eval_loss"),
        (
            ["tune.search=random", "tune.scheduler=fifo", "tune.objectives=[eval_loss, size_mb]"],
            "tune.search=optuna",
        ),
        (["tune.search=optuna", "tune.objectives=[eval_loss, size_mb]"], "tune.scheduler=fifo"),
        ([*MO[:2], "tune.objectives=[eval_loss, speed]"], "speed"),
    ],
)
def test_bad_objectives_are_refused_with_the_fix(items, match):
    with pytest.raises(ConfigError, match=match):
        cfg(*items)


def test_sampler_is_nsga2_unless_tpe_or_random_is_asked_for():
    import optuna

    assert isinstance(sampler(cfg(*MO)), optuna.samplers.NSGAIISampler)
    assert isinstance(sampler(cfg(*MO, "tune.sampler=tpe")), optuna.samplers.TPESampler)
    assert isinstance(sampler(cfg(*MO, "tune.sampler=random")), optuna.samplers.RandomSampler)


def test_pareto_rows_over_three_objectives_with_one_maximised():
    rows = [
        {"id": "a", "eval_loss": 1.0, "size_mb": 10.0, "sparsity": 0.5},
        {"id": "b", "eval_loss": 1.0, "size_mb": 10.0, "sparsity": 0.4},  # beaten by a on sparsity only
        {"id": "c", "eval_loss": 0.9, "size_mb": 20.0, "sparsity": 0.1},  # best loss
        {"id": "d", "eval_loss": 2.0, "size_mb": 5.0, "sparsity": 0.2},  # smallest
        {"id": "e", "eval_loss": 2.0, "size_mb": 6.0, "sparsity": 0.2},  # beaten by d
        {"id": "f", "eval_loss": None, "size_mb": 1.0, "sparsity": 0.9},  # no loss: not a candidate
        {"id": "g", "eval_loss": 1.0, "size_mb": 10.0, "sparsity": 0.5},  # ties a: neither beats the other
    ]
    front = [r["id"] for r in pareto_rows(rows, ["eval_loss", "size_mb", "sparsity"])]
    assert front == ["a", "c", "d", "g"]
    assert [r["id"] for r in pareto_rows(rows, ["eval_loss", "size_mb"])] == ["a", "b", "c", "d", "g"]


def test_hypervolume_of_a_staircase():
    # (1,3), (2,2), (3,1) under ref (4,4): 3*1 + 2*1 + 1*1 = 6; dominated and outside points add 0
    assert hypervolume_2d([(1, 3), (2, 2), (3, 1)], (4, 4)) == pytest.approx(6.0)
    assert hypervolume_2d([(1, 3), (2, 2), (3, 1), (3, 3), (5, 0), (0, 4)], (4, 4)) == pytest.approx(6.0)
    assert hypervolume_2d([], (4, 4)) == 0.0
    rows = [{"eval_loss": 1.0, "sparsity": 0.5}, {"eval_loss": 2.0, "sparsity": 0.75}]
    # signed: sparsity is maximised, so its coordinate is -sparsity and the ref bound -0.0
    assert front_hypervolume(rows, ["eval_loss", "sparsity"], (3.0, 0.0)) == pytest.approx(
        2.0 * 0.5 + 1.0 * 0.25
    )


def test_decode_rel_needs_a_shape_vllm_runs_on_cpu(tmp_path):
    from bloomray.tune.space import check_space

    mo = [*MO[:2], "tune.objectives=[eval_loss, decode_rel]"]
    check_space(cfg(*mo))  # the preset's small shape: head size 256 / 8 = 32
    with pytest.raises(ConfigError, match="this model's is 16 .*model.preset=small"):
        check_space(cfg(*mo, "model.preset=tiny"))
    (tmp_path / "config.json").write_text('{"hidden_size": 96, "n_head": 4}')
    with pytest.raises(ConfigError, match="this model's is 24"):
        check_space(cfg(*mo, f"model.path={tmp_path}"))
    check_space(cfg(*mo, "model.preset=tiny", "scaling.use_gpu=true"))  # GPU attention takes 16


def test_engine_binds_the_cores_it_may_run_on_and_the_mix_is_fixed():
    from bloomray.tune.engine_latency import cpu_bind, request_mix

    assert cpu_bind({0, 1}) == "0-1" and cpu_bind({3}) == "3"
    assert cpu_bind({0, 1, 2, 5, 7, 8}) == "0-2,5,7-8"
    mix = request_mix(300, batch=4, prompt_len=8)
    assert mix == request_mix(300, batch=4, prompt_len=8) and len(mix) == 4
    assert all(len(r) == 8 and all(3 <= t < 300 for t in r) for r in mix)


def _study_points(smp, n: int) -> list[tuple[float, float]]:
    """The (x, y) an Optuna study with ``smp`` asks for in ``n`` trials of a 2-objective toy problem."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=smp)
    for _ in range(n):
        t = study.ask()
        x, y = t.suggest_float("x", 0.0, 1.0), t.suggest_float("y", 0.0, 1.0)
        study.tell(t, [x + y, (1 - x) + y])  # front: y = 0
    return [(t.params["x"], t.params["y"]) for t in study.trials]


def test_a_12_trial_nsga2_search_evolves_after_a_first_generation_of_4():
    from bloomray.tune.objectives import population_size

    c = cfg(*MO, "tune.num_samples=12")
    assert population_size(c) == 4
    assert population_size(cfg(*MO, "tune.num_samples=600")) == 50
    assert population_size(cfg(*MO, "tune.num_samples=12", "tune.population_size=6")) == 6
    nsga = _study_points(sampler(c), 12)
    rand = _study_points(sampler(cfg(*MO, "tune.num_samples=12", "tune.sampler=random")), 12)
    assert nsga[:4] == rand[:4]  # the same first generation: the comparison is paired
    assert nsga[4:] != rand[4:]  # then NSGA-II chooses (Optuna's default population of 50 would not)
