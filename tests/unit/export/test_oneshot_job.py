"""`bloomray prune` before any work: its config keys, the request checks and their messages,
the calibration/eval slices, the summary's measures, the card, and training refusing the
one-shot methods. No Ray, no data preparation (tests/integration/test_prune_oneshot.py runs it).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tiny_bloom import PAD, TARGETS, VOCAB, make_model

from bloomray.cli import main
from bloomray.config import ConfigError, check_trainable, load_config
from bloomray.data.packing import ArrayBlocks
from bloomray.errors import EXIT_USAGE
from bloomray.export.card import _load_section, _oneshot_section, _pruning_section
from bloomray.export.oneshot import check_labels, check_request
from bloomray.model.build import ModelLoadError
from bloomray.model.compact import SPEC_KEY
from bloomray.prune.initial import calibration_and_eval, check_task_resources, eval_scores, sparsity_by_kind
from bloomray.prune.oneshot import OneShotError

BASE = ["train.max_steps=5"]


def cfg(*overrides: str):
    return load_config(None, [*BASE, *overrides])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny plain causal-LM dir (config.json + safetensors; no tokenizer needed for the checks)."""
    d = tmp_path_factory.mktemp("m") / "lm"
    make_model().save_pretrained(d)
    return d


def _config_dir(root: Path, name: str, **extra) -> Path:
    d = root / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "bloom", "hidden_size": 64, **extra}))
    return d


# --------------------------------------------------------------------------- config keys


def test_prune_config_has_the_one_shot_keys_with_their_defaults():
    p = cfg().prune
    assert (p.pattern, p.calibration_samples, p.percdamp, p.blocksize) == ("unstructured", 128, 0.01, 128)
    for method in ("wanda", "sparsegpt"):
        assert cfg(f"prune.method={method}").prune.method == method


@pytest.mark.parametrize("item", ["prune.calibration_samples=0", "prune.blocksize=0", "prune.percdamp=0"])
def test_one_shot_keys_have_lower_bounds(item: str):
    with pytest.raises(ConfigError, match=item.split("=")[0]):
        cfg(item)


def test_unknown_pattern_lists_the_choices():
    with pytest.raises(ConfigError, match="unstructured") as info:
        cfg("prune.pattern=4:8")
    assert "2:4" in str(info.value)


def test_unquoted_two_four_pattern_in_yaml(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("train: {max_steps: 5}\nprune: {method: wanda, pattern: 2:4, final_sparsity: 0.5}\n")
    assert load_config(path).prune.pattern == "2:4"  # YAML 1.1 reads 2:4 as 124


def test_two_four_pattern_needs_half_sparsity_in_the_config():
    with pytest.raises(ConfigError, match="prune.final_sparsity must be 0.5, got 0.3"):
        cfg("prune.method=sparsegpt", "prune.pattern=2:4", "prune.final_sparsity=0.3")


# --------------------------------------------------------------------------- request checks


@pytest.mark.parametrize("method", ["none", "structured", "2:4"])
def test_only_one_shot_methods_are_pruned(model_dir: Path, tmp_path: Path, method: str):
    c = cfg(f"prune.method={method}")
    with pytest.raises(
        OneShotError, match="bloomray prune runs prune.method wanda, sparsegpt, magnitude"
    ) as e:
        check_request(model_dir, c, tmp_path / "out", overwrite=False)
    assert e.value.exit_code == EXIT_USAGE
    assert f"got prune.method={method}" in str(e.value)
    if method == "2:4":
        assert "prune.pattern=2:4" in str(e.value)


def test_two_four_needs_half_sparsity_in_the_request(model_dir: Path, tmp_path: Path):
    c = cfg("prune.method=wanda")
    c.prune.pattern, c.prune.final_sparsity = "2:4", 0.6  # section assignment skips the cross-key check
    with pytest.raises(OneShotError, match="prune.final_sparsity must be 0.5, got 0.6"):
        check_request(model_dir, c, tmp_path / "out", overwrite=False)


def test_model_must_be_a_model_dir(tmp_path: Path):
    with pytest.raises(ModelLoadError, match="is not a model dir \\(no config.json there\\)") as e:
        check_request(tmp_path, cfg("prune.method=wanda"), tmp_path / "out", overwrite=False)
    assert e.value.exit_code == EXIT_USAGE


def test_compacted_dirs_and_a_task_that_is_not_the_models_are_refused(tmp_path: Path):
    compact = _config_dir(tmp_path, "compact", **{SPEC_KEY: {"heads": [], "neurons": []}})
    clf = _config_dir(tmp_path, "clf", architectures=["BloomForSequenceClassification"])
    with pytest.raises(OneShotError, match="compacted structured-pruned export"):
        check_request(compact, cfg("prune.method=wanda"), tmp_path / "out", overwrite=False)
    with pytest.raises(
        ConfigError, match="is a classifier but the config has task=causal_lm: set task=classification"
    ):
        check_request(clf, cfg("prune.method=wanda"), tmp_path / "out", overwrite=False)
    check_request(clf, cfg("prune.method=wanda", "task=classification"), tmp_path / "out", overwrite=False)


def test_two_four_needs_a_hidden_size_divisible_by_4(tmp_path: Path):
    odd = _config_dir(tmp_path, "odd", hidden_size=66, n_head=6)
    c = cfg("prune.method=wanda", "prune.pattern=2:4")
    with pytest.raises(OneShotError, match="divisible by 4"):
        check_request(odd, c, tmp_path / "out", overwrite=False)
    check_request(odd, cfg("prune.method=wanda"), tmp_path / "out", overwrite=False)  # unstructured: fine


def test_existing_output_needs_overwrite(model_dir: Path, tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(OneShotError, match="exists; pass --overwrite to replace it"):
        check_request(model_dir, cfg("prune.method=wanda"), out, overwrite=False)
    assert check_request(model_dir, cfg("prune.method=wanda"), out, overwrite=True)["model_type"] == "bloom"


def test_output_may_not_be_the_model(model_dir: Path):
    with pytest.raises(OneShotError, match="--output is the --model dir"):
        check_request(model_dir, cfg("prune.method=wanda"), model_dir, overwrite=True)


def test_a_causal_lm_with_task_classification_is_refused(model_dir: Path, tmp_path: Path):
    c = cfg("prune.method=wanda", "task=classification")
    with pytest.raises(
        ConfigError, match="is a causal LM but the config has task=classification: set task=causal_lm"
    ):
        check_request(model_dir, c, tmp_path / "out", overwrite=False)


def test_a_classifiers_labels_must_be_the_datas():
    raw = {"id2label": {"0": "neg", "1": "pos"}}
    check_labels("m", raw, {0: "neg", 1: "pos"})
    with pytest.raises(OneShotError, match="has labels .*'neg'.* but data.path has .*'0'"):
        check_labels("m", raw, {0: "0", 1: "1"})
    with pytest.raises(OneShotError, match="set data.labels"):
        check_labels("m", raw, {0: "neg", 1: "pos", 2: "mixed"})


def test_cli_bad_model_exits_2_before_data_or_ray(tmp_path: Path, capsys, monkeypatch):
    import bloomray.export.oneshot as job

    def forbidden(*args, **kwargs):
        raise AssertionError("no data preparation and no Ray for a bad --model")

    monkeypatch.setattr(job, "prepare_data", forbidden)
    monkeypatch.setattr(job, "init_ray", forbidden)
    argv = ["prune", "--model", str(tmp_path), "--config", "tiny-cpu", "--output", str(tmp_path / "o")]
    code = main([*argv, "--set", "prune.method=wanda"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("bloomray: error: --model") and "is not a model dir" in err
    assert "Traceback" not in err


def test_cli_default_method_none_exits_2(model_dir: Path, tmp_path: Path, capsys):
    code = main(["prune", "--model", str(model_dir), "--config", "tiny-cpu", "--output", str(tmp_path / "o")])
    assert code == 2
    assert "got prune.method=none" in capsys.readouterr().err


def test_missing_cluster_resources_are_named_instead_of_waiting_forever():
    with pytest.raises(OneShotError, match="needs 1 GPU but the Ray cluster has 0"):
        check_task_resources(cfg("scaling.use_gpu=true"), {"CPU": 8.0})
    with pytest.raises(OneShotError, match="needs 4 CPU but the Ray cluster has 2"):
        check_task_resources(cfg("scaling.cpus_per_worker=4"), {"CPU": 2.0})
    check_task_resources(cfg(), {"CPU": 1.0})


# --------------------------------------------------------------------------- calibration, measures


class _Blocks:
    def __init__(self, n: int, offset: int) -> None:
        self.ids = np.arange(n * 4, dtype=np.int32).reshape(n, 4) + offset

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        return {"input_ids": self.ids[idx]}


def test_calibration_is_the_first_train_blocks_and_eval_is_bounded():
    data = SimpleNamespace(train=_Blocks(10, 0), eval=_Blocks(9, 1000))
    c = cfg("prune.calibration_samples=3", "train.eval_max_batches=2", "train.micro_batch_size=2")
    calib, evals = calibration_and_eval(c, data)
    assert calib.dtype == np.int64 and evals["input_ids"].dtype == np.int64
    assert np.array_equal(calib, data.train.ids[:3])
    assert list(evals) == ["input_ids"] and np.array_equal(evals["input_ids"], data.eval.ids[:4])  # 2 x 2
    c = cfg("prune.calibration_samples=50")  # more than there are: all of them; eval unbounded: all
    calib, evals = calibration_and_eval(c, data)
    assert len(calib) == 10 and len(evals["input_ids"]) == 9


def _sentences(lengths: list[int], width: int, offset: int) -> ArrayBlocks:
    """Right-padded rows (pad id 0) whose tokens count up from ``offset``; labels alternate."""
    ids, mask, nxt = (
        np.zeros((len(lengths), width), np.int32),
        np.zeros((len(lengths), width), np.int8),
        offset,
    )
    for i, n in enumerate(lengths):
        ids[i, :n], mask[i, :n] = np.arange(nxt, nxt + n), 1
        nxt += n
    return ArrayBlocks({"input_ids": ids, "attention_mask": mask, "labels": np.arange(len(lengths)) % 2})


def test_a_classifiers_calibration_is_its_sentences_tokens_packed_without_padding():
    data = SimpleNamespace(train=_sentences([5, 9, 3, 11, 6], 12, 1), eval=_sentences([2, 3, 4], 12, 100))
    c = cfg("task=classification", "data.block_size=8", "prune.calibration_samples=3")
    calib, evals = calibration_and_eval(c, data)
    assert np.array_equal(calib, np.arange(1, 25).reshape(3, 8))  # pads dropped, rows in order
    assert set(evals) == {"input_ids", "attention_mask", "labels"} and evals["labels"].tolist() == [0, 1, 0]
    # 34 tokens make 4 blocks of 8: asking for 9 gives the 4 there are
    more = cfg("task=classification", "data.block_size=8", "prune.calibration_samples=9")
    assert calibration_and_eval(more, data)[0].shape == (4, 8)


def test_eval_loss_weights_each_batch_by_its_rows():
    model = make_model()
    ids = torch.randint(3, VOCAB, (5, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        per_row = [float(model(input_ids=ids[i : i + 1], labels=ids[i : i + 1]).loss) for i in range(5)]
    assert eval_scores(model, {"input_ids": ids.numpy()}, batch_size=5) == {
        "eval_loss": pytest.approx(np.mean(per_row), rel=1e-5)
    }
    # Batches of 2, 2, 1: same per-row weighting (every row has the same number of tokens).
    assert eval_scores(model, {"input_ids": ids.numpy()}, batch_size=2)["eval_loss"] == pytest.approx(
        np.mean(per_row), rel=1e-5
    )


def test_a_classifiers_eval_has_its_accuracy_on_the_padded_rows():
    model = make_model("classification")  # 3 labels; pad id PAD
    data = _sentences([3, 5, 2, 6, 4], 6, PAD + 1)  # padded with PAD
    evals = {k: data[k].astype(np.int64) for k in data}
    with torch.no_grad():
        rows = [model(**{k: torch.tensor(v[i : i + 1]) for k, v in evals.items()}) for i in range(5)]
    want_acc = np.mean(
        [int(r.logits.argmax(-1)) == lab for r, lab in zip(rows, evals["labels"], strict=True)]
    )
    got = eval_scores(model, evals, batch_size=2)  # padded rows batched together: the same per-row result
    assert got["eval_accuracy"] == pytest.approx(want_acc)
    assert got["eval_loss"] == pytest.approx(np.mean([float(r.loss) for r in rows]), rel=1e-5)


def test_sparsity_by_kind_counts_exact_zeros():
    model = make_model()
    with torch.no_grad():
        model.transformer.h[0].mlp.dense_4h_to_h.weight[:, ::2] = 0  # half of one of the two layers
    overall, kinds = sparsity_by_kind(model, TARGETS)
    assert kinds == {"query_key_value": 0.0, "dense": 0.0, "dense_h_to_4h": 0.0, "dense_4h_to_h": 0.25}
    total = sum(p.numel() for n, p in model.named_parameters() if n.endswith(".weight") and p.ndim == 2)
    total -= model.transformer.word_embeddings.weight.numel()  # not a block weight
    assert overall == pytest.approx(64 * 128 / total)


# --------------------------------------------------------------------------- card, training


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_card_load_snippet_of_a_one_shot_export(method: str):
    text = _load_section("m", {"task": "causal_lm", "config": {"prune": {"method": method}}})
    assert "load_model(" in text and "densely on vLLM" in text


def test_card_pruning_section_names_method_pattern_sparsity_and_calibration():
    shot = {
        "method": "sparsegpt",
        "pattern": "2:4",
        "sparsity_target": 0.5,
        "sparsity": 0.5,
        "targets": TARGETS,
        "sparsity_by_kind": dict.fromkeys(TARGETS, 0.5),
        "calibration_samples": 16,
        "block_size": 32,
        "calibration_tokens": 512,
        "eval_blocks": 8,
        "eval_loss_before": 5.0,
        "eval_loss_after": 5.25,
        "percdamp": 0.01,
        "blocksize": 128,
    }
    text = _oneshot_section(shot, {})
    for part in ("one-shot sparsegpt", "pattern 2:4", "target sparsity 0.5", "16 samples", "32 tokens"):
        assert part in text
    assert "5.0000 dense -> 5.2500 pruned" in text and "| dense_4h_to_h | 0.5000 |" in text


@pytest.mark.parametrize(
    ("items", "match"),
    [
        (["prune.method=wanda"], "prune.method=wanda prunes a trained model .* set model.path"),
        (["prune.method=sparsegpt", "model.path=/m"], "prune.initial_sparsity, which is 0"),
        (
            ["prune.method=wanda", "model.path=/m", "prune.pattern=2:4", "prune.initial_sparsity=0.3"],
            "set prune.initial_sparsity=0.5",
        ),
        (
            ["prune.method=wanda", "model.path=/m", "prune.initial_sparsity=0.5", "task=sft"],
            "causal_lm or classification",
        ),
        (["prune.method=magnitude", "prune.pattern=2:4"], "set prune.method=2:4"),
    ],
)
def test_training_refuses_one_shot_settings_it_cannot_start_from(items: list[str], match: str):
    with pytest.raises(ConfigError, match=match):
        check_trainable(cfg(*items))


def test_training_takes_wanda_and_sparsegpt_as_initial_masks_of_a_trained_model():
    check_trainable(cfg("prune.method=magnitude"))
    check_trainable(cfg("prune.method=wanda", "model.path=/m", "prune.initial_sparsity=0.5"))
    check_trainable(
        cfg("prune.method=wanda", "model.path=/m", "prune.initial_sparsity=0.5", "task=classification")
    )
    check_trainable(
        cfg("prune.method=sparsegpt", "model.path=/m", "prune.pattern=2:4", "prune.initial_sparsity=0.5")
    )


def test_pretrain_with_wanda_and_no_model_exits_2_before_any_work(tmp_path: Path, capsys, monkeypatch):
    import bloomray.export.run as run

    def forbidden(*args, **kwargs):
        raise AssertionError("no data, no Ray: the config is refused first")

    monkeypatch.setattr(run, "start_run", forbidden)
    code = main(["pretrain", "--output", str(tmp_path / "o"), "--set", "prune.method=wanda"])
    assert code == 2
    assert "set model.path" in capsys.readouterr().err


def test_tune_space_compares_one_shot_methods_only_from_a_trained_model():
    from bloomray.tune.space import check_space

    space = "tune.space={prune.method: {type: choice, values: [magnitude, wanda, sparsegpt]}}"
    with pytest.raises(ConfigError, match="value 'wanda' is not a valid config:\n.*set model.path"):
        check_space(cfg(space, "prune.initial_sparsity=0.5"))
    check_space(cfg(space, "prune.initial_sparsity=0.5", "model.path=/m"))


def test_card_of_a_training_run_that_started_from_wanda_masks():
    prune = {"method": "wanda", "pattern": "2:4", "calibration_samples": 16, "initial_sparsity": 0.5}
    meta = {"config": {"prune": prune}, "metrics": {"sparsity/layer_0": 0.5}}
    text = _pruning_section(meta, {"dense_size_bytes": 2**20, "size_on_disk_bytes": 2**19})
    assert "wanda one-shot (2:4 semi-structured) on 16 calibration samples at sparsity 0.5" in text
