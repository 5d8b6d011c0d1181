"""Pareto front, knee, winner selection and search-space checks (no Ray run)."""

import pytest

from bloomray.config import ConfigError, load_config
from bloomray.tune.select import Candidate, choose_winner, knee, pareto_front
from bloomray.tune.space import check_space, param_space, trial_config


def _c(i, q, t, s=0.0):
    return Candidate(f"t{i}", q, t, s, {})


def test_pareto_front_drops_dominated_points():
    cands = [_c(0, 5.0, 10), _c(1, 4.0, 20), _c(2, 6.0, 30), _c(3, 3.0, 40), _c(4, 4.5, 25)]
    assert [c.trial_id for c in pareto_front(cands)] == ["t0", "t1", "t3"]


def test_knee_is_the_bend_of_the_front():
    front = [_c(0, 10.0, 1), _c(1, 2.0, 2), _c(2, 1.5, 10), _c(3, 1.4, 20)]
    assert knee(front).trial_id == "t1"


def test_budget_picks_best_quality_within_it_else_knee_and_says_so():
    cands = [_c(0, 5.0, 10, 0.5), _c(1, 4.0, 20, 0.25), _c(2, 3.0, 40, 0.0)]
    assert choose_winner(cands, 25, None)[0].trial_id == "t1"
    assert choose_winner(cands, None, 0.5)[0].trial_id == "t0"
    winner, why = choose_winner(cands, 1, None)
    assert "no trial met select.max_latency_ms=1" in why and "knee" in why
    with pytest.raises(ValueError, match="no trial finished"):
        choose_winner([], None, None)


def test_space_checks_and_trial_configs():
    cfg = load_config("tune-tiny-cpu")
    check_space(cfg)
    space = param_space(cfg)
    assert set(space) == set(cfg.tune.space)
    trial = trial_config(cfg.model_dump(mode="json"), {"train.lr": 0.003, "prune.final_sparsity": 0.75})
    assert trial.train.lr == 0.003 and trial.prune.final_sparsity == 0.75
    with pytest.raises(ConfigError, match="not a config key|unknown config key"):
        check_space(load_config("tune-tiny-cpu", ["tune.space={train.lrr: {type: choice, values: [1]}}"]))
    with pytest.raises(ConfigError, match="cannot vary per trial"):
        check_space(
            load_config("tune-tiny-cpu", ["tune.space={scaling.num_workers: {type: grid, values: [1, 2]}}"])
        )


def test_optuna_tuner_builds(tmp_path, monkeypatch):
    import ray.tune.search.optuna

    import bloomray.tune.driver as driver

    def recorder(kind: str):
        def build(*args, **kwargs):
            return (kind, args, kwargs)

        return build

    monkeypatch.setattr(driver.tune, "Tuner", recorder("tuner"))
    monkeypatch.setattr(driver.tune.schedulers, "ASHAScheduler", recorder("asha"))
    monkeypatch.setattr(ray.tune.search.optuna, "OptunaSearch", recorder("optuna"))
    cfg = load_config("tune-tiny-cpu", ["tune.search=optuna", "tune.seed=7", "tune.max_failures=2"])

    def trainable(config):
        return None

    kind, (given,), kw = driver.build_tuner(cfg, tmp_path, trainable)
    assert kind == "tuner" and given is trainable
    assert set(kw["param_space"]) == {"train.lr", "prune.final_sparsity", "prune.schedule"}
    tc, rc = kw["tune_config"], kw["run_config"]
    assert (tc.metric, tc.mode, tc.num_samples, tc.max_concurrent_trials) == ("eval_loss", "min", 4, 1)
    assert tc.search_alg == ("optuna", (), {"seed": 7})
    assert tc.scheduler == (
        "asha",
        (),
        {"time_attr": "training_iteration", "grace_period": 3, "reduction_factor": 2},
    )
    assert (rc.name, rc.storage_path, rc.failure_config.max_failures) == ("tune", str(tmp_path), 2)
    # A quality metric to maximise, random search and no early stopping.
    cfg = load_config(
        "classify-tiny-cpu", ["tune.metric=eval_macro_f1", "tune.scheduler=fifo", "tune.space={}"]
    )
    tc = driver.build_tuner(cfg, tmp_path, trainable)[2]["tune_config"]
    assert (tc.metric, tc.mode, tc.search_alg, tc.scheduler) == ("eval_macro_f1", "max", None, None)
