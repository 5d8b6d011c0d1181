"""`bloomray <verb>`: help texts, argument plumbing and error exit codes (no Ray started)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bloomray.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[2]
CONSOLE_SCRIPT = Path(sys.executable).parent / "bloomray"

VERB_OPTIONS = {
    "pretrain": ["--config", "--output", "--set", "--resume", "--address"],
    "finetune": ["--config", "--output", "--set", "--resume", "--address"],
    "export": ["--checkpoint", "--output", "--overwrite"],
    "demo": ["--output", "--set", "--trials"],
    "tune": ["--config", "--output", "--set", "--resume", "--address"],
    "serve": ["--model", "--config", "--print-config", "--port", "--host", "--address"],
    "quantize": ["--model", "--output"],
    "prune": ["--model", "--config", "--output", "--set", "--overwrite", "--address"],
    "prepare-data": ["--config", "--output", "--set", "--workers", "--shard-mb", "--overwrite", "--address"],
}


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    """main(argv) -> (exit code, stdout, stderr), whether it returns or raises SystemExit."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_top_level_help(capsys):
    code, out, _ = run_main(["--help"], capsys)
    assert code == 0
    for verb in VERB_OPTIONS:
        assert verb in out
    assert "examples:" in out
    assert "bloomray pretrain --config tiny-cpu" in out


@pytest.mark.parametrize("verb", sorted(VERB_OPTIONS))
def test_verb_help_lists_its_options(verb: str, capsys):
    code, out, _ = run_main([verb, "--help"], capsys)
    assert code == 0
    assert f"usage: bloomray {verb}" in out
    for option in VERB_OPTIONS[verb]:
        assert option in out


def test_run_verbs_default_to_their_presets():
    parser = build_parser()
    assert parser.parse_args(["pretrain"]).config == "tiny-cpu"
    assert parser.parse_args(["finetune"]).config == "classify-tiny-cpu"
    args = parser.parse_args(["pretrain", "--set", "a.b=1", "--set", "c.d=2"])
    assert args.overrides == ["a.b=1", "c.d=2"]


def test_console_script_help():
    assert CONSOLE_SCRIPT.exists(), "pip install -e . should have installed the bloomray script"
    out = subprocess.run(
        [str(CONSOLE_SCRIPT), "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0
    assert "usage: bloomray" in out.stdout
    assert "pretrain" in out.stdout


def test_no_verb_is_a_usage_error(capsys):
    code, _, err = run_main([], capsys)
    assert code == 2
    assert "usage: bloomray" in err


def test_unknown_verb_is_a_usage_error(capsys):
    code, _, err = run_main(["train"], capsys)
    assert code == 2
    assert "invalid choice" in err


def test_export_requires_checkpoint_and_output(capsys):
    code, _, err = run_main(["export", "--output", "x"], capsys)
    assert code == 2
    assert "--checkpoint" in err


def test_bad_config_key_exits_2_without_traceback(capsys):
    code, out, err = run_main(["pretrain", "--set", "train.lrr=0.1"], capsys)
    assert code == 2
    assert "unknown config key 'train.lrr'" in err
    assert "Did you mean 'train.lr'?" in err
    assert err.startswith("bloomray: error:")
    assert "Traceback" not in err + out


def test_bad_config_combination_exits_2(capsys):
    code, _, err = run_main(["pretrain", "--set", "deepspeed.precision=fp16"], capsys)
    assert code == 2
    assert "bf16" in err


def test_missing_config_exits_2_naming_presets(tmp_path: Path, capsys):
    code, _, err = run_main(["pretrain", "--config", str(tmp_path / "none.yaml")], capsys)
    assert code == 2
    assert "config file not found" in err
    assert "tiny-cpu" in err


def test_run_verbs_help_names_the_presets(capsys, monkeypatch):
    from bloomray.config import preset_names

    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping (argparse breaks lines at hyphens)
    code, out, _ = run_main(["pretrain", "--help"], capsys)
    assert code == 0
    assert ", ".join(preset_names()) in out and "jobs/configs" not in out


def test_serve_print_config_writes_the_shipped_serve_config(capsys):
    import yaml

    from bloomray.serving.run import DEFAULT_CONFIG

    code, out, _ = run_main(["serve", "--print-config"], capsys)
    assert code == 0
    assert out == DEFAULT_CONFIG.read_text()
    assert yaml.safe_load(out)["applications"][0]["import_path"] == "bloomray.serving.app:build_app"


def test_pretrain_refuses_a_classification_config(capsys):
    code, _, err = run_main(["pretrain", "--config", "classify-tiny-cpu"], capsys)
    assert code == 2
    assert "bloomray finetune" in err


def test_resume_without_a_run_exits_2(tmp_path: Path, capsys):
    code, _, err = run_main(["pretrain", "--resume", str(tmp_path / "nothing")], capsys)
    assert code == 2
    assert str(tmp_path / "nothing") in err


def test_bad_data_path_exits_2_before_ray(tmp_path: Path, capsys, monkeypatch):
    import bloomray.train.run as run

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray must not start for a bad data path")

    monkeypatch.setattr(run, "init_ray", no_ray)
    missing = tmp_path / "missing.csv"
    code, _, err = run_main(
        ["finetune", "--output", str(tmp_path / "out"), "--set", f"data.path={missing}"], capsys
    )
    assert code == 2
    assert f"data path not found: {missing}" in err
    assert "Traceback" not in err


def test_export_of_a_non_checkpoint_exits_2(tmp_path: Path, capsys):
    code, _, err = run_main(
        ["export", "--checkpoint", str(tmp_path), "--output", str(tmp_path / "m")], capsys
    )
    assert code == 2
    assert "not a bloomray checkpoint" in err


def test_export_onto_existing_output_exits_1(tmp_path: Path, capsys):
    (tmp_path / "m").mkdir()
    code, _, err = run_main(
        ["export", "--checkpoint", str(tmp_path), "--output", str(tmp_path / "m")], capsys
    )
    assert code == 1
    assert "--overwrite" in err


def test_train_verbs_pass_config_output_and_overrides(tmp_path: Path, capsys, monkeypatch):
    import bloomray.export.run as run

    calls = []

    def fake_run_training(cfg, out, resume=False):
        calls.append((cfg, Path(out), resume))
        return {"model_dir": "somewhere", "steps": cfg.train.max_steps}

    monkeypatch.setattr(run, "run_training", fake_run_training)
    code, out, _ = run_main(
        [
            "pretrain",
            "--output",
            str(tmp_path / "o"),
            "--set",
            "train.max_steps=3",
            "--address",
            "ray://head:10001",
        ],
        capsys,
    )
    assert code == 0
    cfg, where, resume = calls[-1]
    assert where == tmp_path / "o" and resume is False
    assert cfg.train.max_steps == 3
    assert cfg.ray.address == "ray://head:10001"
    assert cfg.model.preset == "small"  # from the tiny-cpu preset
    assert json.loads(out) == {"model_dir": "somewhere", "steps": 3}

    # Without --output, the config's output.dir is used.
    assert run_main(["finetune", "--set", "output.dir=from-config"], capsys)[0] == 0
    cfg, where, _ = calls[-1]
    assert cfg.task == "classification"
    assert where == Path("from-config")


def test_resume_uses_the_saved_config(tmp_path: Path, capsys, monkeypatch):
    import bloomray.export.run as run
    from bloomray.config import dump_config, load_config

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    dump_config(load_config("tiny-cpu", ["train.lr=0.123"]), run_dir / "config.yaml")
    calls = []
    monkeypatch.setattr(
        run, "run_training", lambda cfg, out, resume=False: calls.append((cfg, out, resume)) or {}
    )
    code, _, _ = run_main(["pretrain", "--resume", str(run_dir), "--set", "train.max_steps=99"], capsys)
    assert code == 0
    cfg, out, resume = calls[-1]
    assert resume is True and Path(out) == run_dir
    assert cfg.train.lr == pytest.approx(0.123)
    assert cfg.train.max_steps == 99


def test_demo_passes_output_and_overrides(tmp_path: Path, capsys, monkeypatch):
    import bloomray.demo as demo

    calls = []
    monkeypatch.setattr(
        demo,
        "run_demo",
        lambda output, overrides, trials, verbose: calls.append((output, overrides, trials, verbose)),
    )
    argv = ["demo", "--output", str(tmp_path / "d"), "--set", "train.max_steps=2", "--trials", "2"]
    code, _, _ = run_main(argv, capsys)
    assert code == 0
    assert calls == [(tmp_path / "d", ["train.max_steps=2"], 2, False)]
    assert run_main(["-v", *argv], capsys)[0] == 0
    assert calls[-1][3] is True  # -v: Ray's own log lines on the console too


# ---------------------------------------------------------------- errors: one line or a traceback


# (module, class, exit code, the builtin base that old `except` clauses still catch)
ERROR_KINDS = [
    ("bloomray.config", "ConfigError", 2, ValueError),
    ("bloomray.data.corpus", "DataError", 2, ValueError),
    ("bloomray.train.batches", "DataTooSmallError", 2, ValueError),
    ("bloomray.data.tokenizer", "TokenizerError", 2, ValueError),
    ("bloomray.model.build", "ModelLoadError", 2, OSError),
    ("bloomray.train.checkpoint", "CorruptCheckpointError", 2, ValueError),
    ("bloomray.serving.quantize", "QuantizeError", 2, ValueError),
    ("bloomray.train.run", "TrainingError", 1, RuntimeError),
    ("bloomray.export.consolidate", "ExportError", 1, RuntimeError),
    ("bloomray.demo", "DegenerateCompletionError", 1, RuntimeError),
]


def _demo_raises(monkeypatch, exc: BaseException) -> None:
    import bloomray.demo as demo

    def boom(output, overrides, trials, verbose):
        raise exc

    monkeypatch.setattr(demo, "run_demo", boom)


@pytest.mark.parametrize(
    ("module", "name", "exit_code", "builtin"), ERROR_KINDS, ids=[k[1] for k in ERROR_KINDS]
)
def test_a_bloomray_error_is_one_line_with_its_exit_code(
    module: str, name: str, exit_code: int, builtin: type, capsys, monkeypatch
):
    import importlib

    from bloomray.errors import BloomrayError

    cls = getattr(importlib.import_module(module), name)
    assert issubclass(cls, BloomrayError) and issubclass(cls, builtin)  # old `except` still works
    assert cls.exit_code == exit_code
    assert f"Exit code {exit_code}" in (cls.__doc__ or "")  # each kind documents its code
    _demo_raises(monkeypatch, cls("data.path=x.csv has no text column; set data.text_column"))
    code, out, err = run_main(["demo"], capsys)
    assert code == exit_code
    assert err == "bloomray: error: data.path=x.csv has no text column; set data.text_column\n"
    assert "Traceback" not in out + err


@pytest.mark.parametrize("exc", [ZeroDivisionError("division by zero"), ValueError("a plain bug")])
def test_an_unexpected_error_prints_its_traceback_and_exits_1(exc: Exception, capsys, monkeypatch):
    _demo_raises(monkeypatch, exc)
    code, _, err = run_main(["demo"], capsys)
    assert code == 1
    assert "Traceback (most recent call last)" in err
    assert f"{type(exc).__name__}: {exc}" in err
    assert "in boom" in err  # the frame that raised it
    assert err.rstrip().splitlines()[-1].startswith("bloomray: internal error")


@pytest.mark.parametrize("argv", [["-v", "demo"], ["demo", "-v"], ["demo", "--verbose"]])
def test_verbose_adds_the_traceback_of_a_bloomray_error(argv: list[str], capsys, monkeypatch):
    from bloomray.config import ConfigError

    _demo_raises(monkeypatch, ConfigError("train.lr must be > 0"))
    code, _, err = run_main(argv, capsys)
    assert code == 2
    assert "Traceback (most recent call last)" in err and "ConfigError: train.lr must be > 0" in err
    assert err.rstrip().splitlines()[-1] == "bloomray: error: train.lr must be > 0"


def test_keyboard_interrupt_exits_130(capsys, monkeypatch):
    _demo_raises(monkeypatch, KeyboardInterrupt())
    code, _, err = run_main(["demo"], capsys)
    assert code == 130
    assert "interrupted" in err and "Traceback" not in err


def test_a_bloomray_error_hint_follows_the_message():
    from bloomray.config import ConfigError

    assert str(ConfigError("bad train.lr", hint="try 3e-4")) == "bad train.lr (try 3e-4)"


def test_demo_replaces_only_a_dir_it_created(tmp_path: Path):
    from bloomray.config import ConfigError
    from bloomray.demo import DEMO_MARKER, claim_output

    mine = tmp_path / "precious"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(ConfigError, match="was not created by `bloomray demo`"):
        claim_output(mine)
    assert (mine / "thesis.tex").read_text() == "years of work"

    out = claim_output(tmp_path / "demo")  # new: created and marked
    (out / "pretrain").mkdir()
    again = claim_output(tmp_path / "demo")  # the demo's own dir: replaced, fresh
    assert again == out and sorted(p.name for p in out.iterdir()) == [DEMO_MARKER]
    (tmp_path / "empty").mkdir()
    assert (claim_output(tmp_path / "empty") / DEMO_MARKER).is_file()  # an empty dir holds nothing to lose


def test_quiet_mode_keeps_ray_output_off_the_console(monkeypatch):
    """BLOOMRAY_QUIET=1 (the demo without -v): ray.init gets log_to_driver=False."""
    import ray

    import bloomray.raycluster as rc

    seen = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(kw))
    monkeypatch.setenv(rc.QUIET_ENV, "1")
    rc.init_ray(num_cpus=2)
    assert seen["log_to_driver"] is False and seen["num_cpus"] == 2
    seen.clear()
    monkeypatch.setenv(rc.QUIET_ENV, "0")
    rc.init_ray(num_cpus=2)
    assert "log_to_driver" not in seen
