"""Config: presets load, overrides parse, and every error names the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bloomray.config import (
    Config,
    ConfigError,
    apply_override,
    config_from_dict,
    dump_config,
    load_config,
    preset_names,
    resolve_preset,
)
from bloomray.config.schema import auto_precision

PRESETS = preset_names()
# Smallest valid settings: everything else keeps its default.
BASE = ["train.max_steps=5"]


def test_preset_dir_has_the_documented_presets():
    assert {"tiny-cpu", "classify-tiny-cpu", "bloom-560m-zero2"} <= set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_loads_and_validates(preset: str):
    cfg = load_config(preset)
    assert isinstance(cfg, Config)
    t, s = cfg.train, cfg.scaling
    # The combination checks ran: the batch arithmetic works out exactly.
    assert cfg.grad_accum_steps * t.micro_batch_size * s.num_workers == t.global_batch_size
    assert t.max_steps is not None or t.epochs is not None
    # A preset's header comment shows how to launch it (a command line, by preset name).
    text = resolve_preset(preset).read_text()
    assert text.splitlines()[0].startswith("#")
    assert "jobs/configs" not in text


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_loads_by_name_as_by_path(preset: str):
    path = resolve_preset(preset)
    assert load_config(preset) == load_config(path)
    assert load_config(f"{preset}.yaml") == load_config(path)
    # The pre-package path users may still type resolves to the packaged preset by its name.
    assert load_config(f"jobs/configs/{preset}.yaml") == load_config(path)


def test_cpu_presets_run_on_cpu():
    for name, model in (("tiny-cpu", "small"), ("classify-tiny-cpu", "tiny")):
        cfg = load_config(name)
        assert cfg.scaling.use_gpu is False
        # auto: bf16 runs on CPU, fp32 where x86 lacks AVX-512 (bf16 emulated)
        assert (cfg.deepspeed.precision, cfg.model.preset) == (auto_precision(False), model)
    assert load_config("classify-tiny-cpu").task == "classification"
    assert load_config("tiny-cpu").task == "causal_lm"


def test_defaults_need_a_length():
    with pytest.raises(ConfigError, match=r"train\.max_steps or train\.epochs"):
        load_config(None)


def test_unknown_key_names_it_and_suggests_the_close_match():
    with pytest.raises(ConfigError) as exc:
        load_config(None, [*BASE, "train.lrr=0.1"])
    msg = str(exc.value)
    assert "unknown config key 'train.lrr'" in msg
    assert "Did you mean 'train.lr'?" in msg
    assert "warmup_steps" in msg  # the allowed keys of that section are listed


def test_unknown_nested_key_suggests_within_its_section():
    with pytest.raises(ConfigError) as exc:
        load_config(None, [*BASE, "data.tokenizer.vocab_sise=100"])
    assert "unknown config key 'data.tokenizer.vocab_sise'" in str(exc.value)
    assert "Did you mean 'data.tokenizer.vocab_size'?" in str(exc.value)


def test_unknown_top_level_section():
    with pytest.raises(ConfigError) as exc:
        config_from_dict({"train": {"max_steps": 1}, "trian": {}})
    assert "unknown config key 'trian'" in str(exc.value)
    assert "Did you mean 'train'?" in str(exc.value)


def test_unknown_key_without_close_match_has_no_guess():
    with pytest.raises(ConfigError) as exc:
        load_config(None, [*BASE, "train.zzzzzz=1"])
    assert "unknown config key 'train.zzzzzz'" in str(exc.value)
    assert "Did you mean" not in str(exc.value)


def test_wrong_type_names_the_key_and_value():
    with pytest.raises(ConfigError) as exc:
        load_config(None, [*BASE, "train.micro_batch_size=lots"])
    msg = str(exc.value)
    assert "train.micro_batch_size" in msg
    assert "'lots'" in msg


def test_out_of_range_value_names_the_key():
    with pytest.raises(ConfigError, match=r"train\.lr"):
        load_config(None, [*BASE, "train.lr=-1"])


def test_bad_literal_lists_the_choices():
    with pytest.raises(ConfigError) as exc:
        load_config(None, [*BASE, "deepspeed.precision=fp8"])
    assert "deepspeed.precision" in str(exc.value)
    assert "bf16" in str(exc.value)


def test_fp16_on_cpu_fails_and_suggests_bf16():
    with pytest.raises(ConfigError) as exc:
        load_config(None, [*BASE, "deepspeed.precision=fp16", "scaling.use_gpu=false"])
    assert "fp16" in str(exc.value)
    assert "bf16" in str(exc.value)
    # ... and is fine on GPU.
    assert (
        load_config(None, [*BASE, "deepspeed.precision=fp16", "scaling.use_gpu=true"]).deepspeed.precision
        == "fp16"
    )


def test_fused_adam_on_cpu_fails():
    with pytest.raises(ConfigError, match="fused_adam needs a GPU"):
        load_config(None, [*BASE, "deepspeed.optimizer=fused_adam"])


def test_global_batch_not_divisible_names_both_keys():
    with pytest.raises(ConfigError) as exc:
        load_config(
            None, [*BASE, "train.global_batch_size=10", "train.micro_batch_size=4", "scaling.num_workers=2"]
        )
    msg = str(exc.value)
    assert "train.global_batch_size=10" in msg
    assert "train.micro_batch_size" in msg
    assert "scaling.num_workers" in msg
    assert "multiple of 8" in msg


def test_grad_accum_steps():
    cfg = load_config(
        None, [*BASE, "train.global_batch_size=48", "train.micro_batch_size=4", "scaling.num_workers=3"]
    )
    assert cfg.grad_accum_steps == 4


def test_offload_optimizer_needs_cpu_adam():
    with pytest.raises(ConfigError) as exc:
        load_config(None, [*BASE, "deepspeed.offload_optimizer=true", "deepspeed.optimizer=adamw"])
    assert "cpu_adam" in str(exc.value)
    assert "deepspeed.optimizer=adamw" in str(exc.value)
    for optimizer in ("cpu_adam", "auto"):  # auto picks cpu_adam under ZeRO-Offload
        ok = load_config(
            None, [*BASE, "deepspeed.offload_optimizer=true", f"deepspeed.optimizer={optimizer}"]
        )
        assert ok.deepspeed.offload_optimizer is True


def test_offload_params_needs_zero3():
    with pytest.raises(ConfigError, match="zero_stage=3"):
        load_config(None, [*BASE, "deepspeed.offload_params=true", "deepspeed.optimizer=cpu_adam"])
    ok = load_config(
        None,
        [*BASE, "deepspeed.offload_params=true", "deepspeed.optimizer=cpu_adam", "deepspeed.zero_stage=3"],
    )
    assert ok.deepspeed.offload_params is True


def test_offload_optimizer_needs_zero_stage_1_or_more():
    with pytest.raises(ConfigError, match="zero_stage 1, 2 or 3"):
        load_config(
            None,
            [
                *BASE,
                "deepspeed.offload_optimizer=true",
                "deepspeed.optimizer=cpu_adam",
                "deepspeed.zero_stage=0",
            ],
        )


def test_compile_is_refused_under_zero3_and_allowed_below():
    with pytest.raises(ConfigError, match="train.compile=true needs deepspeed.zero_stage 0, 1 or 2"):
        load_config(None, [*BASE, "train.compile=true", "deepspeed.zero_stage=3"])
    for stage in (0, 1, 2):
        assert load_config(None, [*BASE, "train.compile=true", f"deepspeed.zero_stage={stage}"]).train.compile


def test_lora_needs_a_pretrained_path():
    with pytest.raises(ConfigError, match="model.path"):
        load_config(None, [*BASE, "model.lora.enabled=true"])
    assert load_config(None, [*BASE, "model.lora.enabled=true", "model.path=/some/dir"]).model.lora.enabled


def test_duplicate_labels_rejected():
    with pytest.raises(ConfigError, match="duplicates"):
        load_config(None, [*BASE, "data.labels=[a,b,a]"])


def test_overrides_parse_numbers_bools_lists_and_null():
    cfg = load_config(
        "tiny-cpu",
        [
            "train.lr=3e-4",
            "train.max_steps=7",
            "train.betas=[0.8, 0.99]",
            "output.tensorboard=false",
            "scaling.use_gpu=true",
            "data.labels=[neg, pos]",
            "train.eval_max_batches=null",
            "data.path=my corpus.txt",
        ],
    )
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.train.max_steps == 7
    assert cfg.train.betas == (0.8, 0.99)
    assert cfg.output.tensorboard is False
    assert cfg.scaling.use_gpu is True
    assert cfg.data.labels == ["neg", "pos"]
    assert cfg.train.eval_max_batches is None
    assert cfg.data.path == "my corpus.txt"
    # Untouched values keep the preset's.
    assert cfg.train.global_batch_size == 16


def test_numeric_values_for_string_keys_are_taken_as_text():
    # `--set output.dir=2024` and `labels: [0, 1]` are parsed by YAML as numbers.
    cfg = load_config(None, [*BASE, "output.dir=2024", "data.labels=[0, 1]"])
    assert cfg.output.dir == "2024"
    assert cfg.data.labels == ["0", "1"]


def test_apply_override_builds_nested_sections():
    raw: dict = {}
    apply_override(raw, "data.tokenizer.vocab_size=512")
    apply_override(raw, "train.lr = 0.5")
    apply_override(raw, "model.path=")
    assert raw == {"data": {"tokenizer": {"vocab_size": 512}}, "train": {"lr": 0.5}, "model": {"path": None}}


def test_apply_override_value_may_contain_equals():
    raw: dict = {}
    apply_override(raw, "data.path=a=b.txt")
    assert raw == {"data": {"path": "a=b.txt"}}


@pytest.mark.parametrize("item", ["train.lr", "=3", "  =x"])
def test_override_without_equals_or_key(item: str):
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_override({}, item)


def test_override_into_a_value_is_an_error():
    raw = {"train": {"lr": 0.1}}
    with pytest.raises(ConfigError, match="'lr' is a value, not a section"):
        apply_override(raw, "train.lr.x=1")


def test_missing_config_file_names_the_presets(tmp_path: Path):
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path / "nope.yaml")
    msg = str(exc.value)
    assert "config file not found" in msg
    assert "nope.yaml" in msg
    for name in PRESETS:
        assert name in msg


def test_bad_yaml_names_the_file(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1, 2\n")
    with pytest.raises(ConfigError) as exc:
        load_config(bad)
    assert "bad.yaml is not valid YAML" in str(exc.value)


def test_yaml_that_is_not_a_mapping(tmp_path: Path):
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(bad)


def test_empty_yaml_is_the_defaults(tmp_path: Path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    assert load_config(empty, BASE) == load_config(None, BASE)


def test_local_file_wins_over_preset_name(tmp_path: Path):
    own = tmp_path / "tiny-cpu.yaml"
    own.write_text("train:\n  max_steps: 3\n")
    assert resolve_preset(own) == own
    assert load_config(own).train.max_steps == 3
    packaged = resolve_preset("tiny-cpu")
    assert packaged.name == "tiny-cpu.yaml" and packaged != own


def test_dump_then_load_round_trips(tmp_path: Path):
    cfg = load_config("classify-tiny-cpu", ["data.labels=[neg, pos]", "train.lr=3e-4"])
    out = tmp_path / "config.yaml"
    dump_config(cfg, out)
    assert yaml.safe_load(out.read_text()) == cfg.model_dump(mode="json")  # the whole resolved config
    assert load_config(out) == cfg


def test_assignment_is_validated():
    cfg = load_config(None, BASE)
    with pytest.raises(ValueError, match="micro_batch_size"):
        cfg.train.micro_batch_size = 0
    assert cfg.train.micro_batch_size == load_config(None, BASE).train.micro_batch_size  # left unchanged


def test_auto_precision_is_fp32_only_on_cpus_that_emulate_bf16(monkeypatch):
    from bloomray.config import schema

    base = [*BASE, "deepspeed.precision=auto"]
    monkeypatch.setattr(schema, "emulates_bf16", lambda: True)
    assert load_config(None, base).deepspeed.precision == "fp32"
    assert load_config(None, [*base, "scaling.use_gpu=true"]).deepspeed.precision == "bf16"
    assert load_config(None, [*BASE, "deepspeed.precision=bf16"]).deepspeed.precision == "bf16"  # asked for
    monkeypatch.setattr(schema, "emulates_bf16", lambda: False)
    assert load_config(None, base).deepspeed.precision == "bf16"
    # resolved once: the dumped config (what a run records and a resume reloads) is concrete
    assert load_config(None, base).model_dump()["deepspeed"]["precision"] == "bf16"


@pytest.mark.parametrize(
    ("flags", "emulated"),
    [("fpu avx avx2 fma", True), ("fpu avx2 avx512f avx512bw", False), ("", False), ("fp asimd", False)],
    ids=["avx2-only", "avx512", "unknown", "arm"],
)
def test_which_cpus_emulate_bf16(flags, emulated):
    from bloomray.cpu import cpu_flags, emulates_bf16

    assert emulates_bf16(cpu_flags(f"processor\t: 0\nflags\t\t: {flags}\n")) is emulated
