"""Classification fine-tuning on real Ray + DeepSpeed: full fine-tune and LoRA on a pretrained dir."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from bloomray.config import load_config
from bloomray.export.run import run_training

pytestmark = pytest.mark.integration

POSITIVE = ["great", "wonderful", "superb", "delightful", "brilliant", "charming", "moving", "excellent"]
NEGATIVE = ["awful", "boring", "dreadful", "clumsy", "tedious", "terrible", "bland", "painful"]
FILLER = ["the", "film", "plot", "cast", "story", "was", "truly", "quite", "and", "its", "score", "ending"]


def write_reviews(path: Path, n: int = 480, seed: int = 0) -> None:
    """A separable sentiment set with a few malformed rows mixed in."""
    rng = random.Random(seed)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh, delimiter="\t")
        w.writerow(["sentence", "label"])
        for i in range(n):
            label = i % 2
            words = rng.sample(FILLER, 5) + rng.sample(POSITIVE if label else NEGATIVE, 2)
            rng.shuffle(words)
            w.writerow([" ".join(words), "positive" if label else "negative"])
        w.writerow(["", "positive"])  # empty text
        w.writerow(["a fine film", "neutral"])  # unknown label
        w.writerow(["  ", "negative"])  # blank text


def test_classification_finetune_reaches_high_accuracy(tmp_path, ray_local):
    data = tmp_path / "reviews.tsv"
    write_reviews(data)
    cfg = load_config(
        "classify-tiny-cpu",
        [
            f"data.path={data}",
            "data.text_column=sentence",
            "data.labels=[negative, positive]",
            "train.epochs=3",
        ],
    )
    out = tmp_path / "cls"
    summary = run_training(cfg, out)
    assert summary["eval_accuracy"] >= 0.9, summary
    assert summary["eval_macro_f1"] >= 0.9
    assert summary["data"]["bad_rows"] == 3  # counted and reported, not silently dropped
    assert summary["data"]["labels"] == ["negative", "positive"]

    model = AutoModelForSequenceClassification.from_pretrained(str(out / "model")).eval()
    tok = AutoTokenizer.from_pretrained(str(out / "model"))
    assert model.config.id2label == {0: "negative", 1: "positive"}
    batch = tok(
        ["the film was wonderful and brilliant", "the plot was tedious and awful"],
        return_tensors="pt",
        padding=True,
        padding_side="right",
    )
    with torch.no_grad():
        pred = model(**batch).logits.argmax(-1).tolist()
    assert [model.config.id2label[p] for p in pred] == ["positive", "negative"]


def test_bad_rows_fail_mode_stops_before_training(tmp_path):
    from bloomray.data.corpus import DataError

    data = tmp_path / "reviews.tsv"
    write_reviews(data, n=20)
    cfg = load_config(
        "classify-tiny-cpu",
        [
            f"data.path={data}",
            "data.text_column=sentence",
            "data.labels=[negative, positive]",
            "data.bad_rows=fail",
        ],
    )
    with pytest.raises(DataError, match="data.bad_rows=skip"):
        run_training(cfg, tmp_path / "cls")
    assert not (tmp_path / "cls" / "checkpoints").exists()


def test_lora_finetune_from_pretrained_dir_zero3(tmp_path, ray_local):
    # Continued training of an existing model dir, with LoRA adapters, ZeRO-3 and
    # activation checkpointing: the export merges the adapters into a plain HF model. The dir
    # is a causal LM of the tiny shape with its tokenizer, as save_pretrained writes one (a
    # pretraining run's export is the same files; test_sft continues from one of those).
    from bloomray.data.corpus import embedded_documents
    from bloomray.data.tokenizer import train_tokenizer
    from bloomray.model.build import build_from_config, preset_config

    base = tmp_path / "base"
    tok = train_tokenizer(embedded_documents()[:30], 512)
    special = {
        "pad_token_id": tok.pad_token_id,
        "eos_token_id": tok.eos_token_id,
        "bos_token_id": tok.bos_token_id,
    }
    build_from_config("causal_lm", preset_config("tiny", len(tok), **special), seed=0).save_pretrained(
        base / "model"
    )
    tok.save_pretrained(base / "model")
    data = tmp_path / "reviews.tsv"
    write_reviews(data, n=160)
    cfg = load_config(
        "classify-tiny-cpu",
        [
            f"data.path={data}",
            "data.text_column=sentence",
            f"model.path={base / 'model'}",
            "model.lora.enabled=true",
            "model.lora.r=4",
            "model.activation_checkpointing=true",
            "deepspeed.zero_stage=3",
            "train.epochs=1",
        ],
    )
    out = tmp_path / "lora"
    summary = run_training(cfg, out)
    # 161 rows (no data.labels: 'neutral' is a third label), 16 held out for eval; one epoch of
    # the 145 left is 72 per worker: 9 micro-batches of 8, no accumulation.
    assert (summary["data"]["train_examples"], summary["steps"]) == (145, 9)
    assert summary["export_max_abs_logit_diff"] < 5e-2
    exported = json.loads((out / "model" / "config.json").read_text())
    assert exported["architectures"] == ["BloomForSequenceClassification"]
    names = AutoModelForSequenceClassification.from_pretrained(str(out / "model")).state_dict().keys()
    assert not [n for n in names if "lora" in n]  # adapters merged, not shipped separately
    _assert_flops_count_every_parameter(Path(summary["checkpoint"]))


def _assert_flops_count_every_parameter(checkpoint: Path) -> None:
    """MFU's FLOPs per token come from the full parameter counts, even though ZeRO-3 leaves
    each rank's module with empty placeholder tensors (sizes only in ``ds_numel``)."""
    from transformers import BloomConfig

    from bloomray.model.build import add_lora, build_from_config, count_parameters
    from bloomray.train.checkpoint import read_meta
    from bloomray.train.metrics import flops_per_token, matmul_params

    meta = read_meta(checkpoint)
    mc = meta["model_config"]
    model = add_lora(
        build_from_config("classification", BloomConfig.from_dict(mc), 0), "classification", meta["lora"]
    )
    ratio = count_parameters(model, trainable_only=True) / count_parameters(model)
    n = matmul_params(model, mc["vocab_size"], mc["hidden_size"], lm_head=False)
    seq = meta["config"]["data"]["block_size"]
    expected = flops_per_token(n, mc["n_layer"], mc["hidden_size"], seq, ratio)
    m = meta["metrics"]
    assert m["flops_per_s"] / m["tokens_per_s"] == pytest.approx(expected, rel=1e-9)
