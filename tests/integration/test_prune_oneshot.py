"""`bloomray prune` end to end on a local Ray: Wanda unstructured 50% and SparseGPT 2:4 of a
tiny export, the written dirs' exact sparsity, the summary against a recomputation from the
loaded dirs, and the refusal to write over an existing output.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from serve_helpers import make_model_dirs

from bloomray.cli import main
from bloomray.config import load_config
from bloomray.data.prepare import prepare_data
from bloomray.data.tokenizer import load_tokenizer
from bloomray.export.load import load_model
from bloomray.prune.masks import target_names

TARGETS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
COMMON = [
    "data.block_size=32",
    "prune.calibration_samples=16",
    "prune.final_sparsity=0.5",
    "train.micro_batch_size=4",
    "train.eval_max_batches=2",
]
RUNS = {
    "wanda": ["prune.method=wanda"],
    "sparsegpt-2to4": ["prune.method=sparsegpt", "prune.pattern=2:4", "prune.blocksize=64"],
}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    """The serving tests' tiny dense LM export (hidden 128, 2 layers, its own BPE tokenizer)."""
    return make_model_dirs(tmp_path_factory.mktemp("models"))


def _argv(model: Path, out: Path, items: list[str]) -> list[str]:
    sets = [arg for item in [*COMMON, *items] for arg in ("--set", item)]
    return ["prune", "--model", str(model), "--config", "tiny-cpu", "--output", str(out), *sets]


def _summary(stdout: str) -> dict:
    """The JSON summary (Ray may interleave the task's own output lines on stdout)."""
    return json.loads(re.search(r"^\{\n.*?^\}$", stdout, re.S | re.M).group(0))


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        if f.is_file():
            h.update(f.relative_to(path).as_posix().encode() + f.read_bytes())
    return h.hexdigest()


def _eval_loss(model: torch.nn.Module, ids: torch.Tensor, batch: int) -> float:
    with torch.no_grad():
        losses = [
            float(model(input_ids=ids[i : i + batch], labels=ids[i : i + batch]).loss)
            * len(ids[i : i + batch])
            for i in range(0, len(ids), batch)
        ]
    return sum(losses) / len(ids)


@pytest.mark.parametrize("run", list(RUNS))
def test_prune_writes_an_exactly_sparse_export(ray_local, dirs, tmp_path: Path, capsys, run: str):
    out = tmp_path / run
    argv = _argv(dirs["lm"], out, RUNS[run])
    assert main(argv) == 0
    summary = _summary(capsys.readouterr().out)
    assert summary["model_dir"] == str(out.resolve())
    assert (summary["calibration_samples"], summary["block_size"], summary["eval_blocks"]) == (16, 32, 8)

    model = load_model(out)
    params = dict(model.named_parameters())
    names = target_names(model, TARGETS)
    assert len(names) == 2 * len(TARGETS)
    for name in names:
        w = params[name].detach()
        rows, cols = w.shape
        if run == "wanda":  # unstructured, exact per output row
            assert ((w == 0).sum(1) == cols // 2).all(), name
        else:  # 2 zeros in every group of 4 consecutive inputs
            assert ((w.reshape(rows, cols // 4, 4) == 0).sum(-1) == 2).all(), name

    # The summary's numbers, recomputed from the written dir and the source dir.
    for kind in TARGETS:
        of_kind = [params[n] for n in names if n.split(".")[-2] == kind]
        zeros = sum(int((p == 0).sum()) for p in of_kind) / sum(p.numel() for p in of_kind)
        assert summary["sparsity_by_kind"][kind] == pytest.approx(zeros, abs=1e-12)
    assert summary["sparsity"] == pytest.approx(0.5, abs=1e-12)
    cfg = load_config("tiny-cpu", [*COMMON, *RUNS[run]])
    data = prepare_data(cfg, tokenizer=load_tokenizer(str(dirs["lm"])))
    evals = torch.from_numpy(data.eval.take(np.arange(8))["input_ids"]).long()
    assert summary["eval_loss_after"] == pytest.approx(_eval_loss(model, evals, 4), rel=1e-5)
    assert summary["eval_loss_before"] == pytest.approx(
        _eval_loss(load_model(dirs["lm"]), evals, 4), rel=1e-5
    )
    assert summary["eval_loss_after"] != summary["eval_loss_before"]

    card = (out / "README.md").read_text()
    method, pattern = ("wanda", "unstructured") if run == "wanda" else ("sparsegpt", "2:4")
    assert f"one-shot {method}, pattern {pattern}" in card
    assert "target sparsity 0.5" in card and "16 samples (the first train blocks) of 32 tokens" in card
    assert f"# {out.name} — " in card

    # Again without --overwrite: exit 2 with the message, the output untouched.
    before = _digest(out)
    assert main(argv) == 2
    err = capsys.readouterr().err.rstrip().splitlines()[-1]  # the last line: after loading bars
    assert err.startswith("bloomray: error: --output") and "exists; pass --overwrite" in err
    assert "Traceback" not in err
    assert _digest(out) == before


def test_prune_refuses_a_compacted_export(dirs, tmp_path: Path, capsys):
    assert main(_argv(dirs["compact"], tmp_path / "o", RUNS["wanda"])) == 2
    assert "compacted structured-pruned export" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_prune_a_classifier_calibrates_on_its_sentences_and_reports_accuracy(
    ray_local, dirs, tmp_path: Path, capsys
):
    from bloomray.data.corpus import embedded_documents
    from bloomray.prune.initial import calibration_and_eval, eval_scores

    words = re.findall(r"[a-z]+", " ".join(embedded_documents()[:40]).lower())
    sentences = [" ".join(words[i : i + 10]) for i in range(0, 1200, 10)]  # 120 of 10 words, no tab
    rows = ["text\tlabel", *(f"{s}\t{('negative', 'positive')[i % 2]}" for i, s in enumerate(sentences))]
    data_file = tmp_path / "labelled.tsv"
    data_file.write_text("\n".join(rows) + "\n")
    items = [
        "task=classification",
        f"data.path={data_file}",
        "prune.method=wanda",
        "prune.calibration_samples=8",
    ]
    out = tmp_path / "clf-wanda"
    assert main(_argv(dirs["clf"], out, items)) == 0
    summary = _summary(capsys.readouterr().out)
    assert (summary["calibration_samples"], summary["block_size"]) == (8, 32)  # packed sentence tokens

    model, source = load_model(out), load_model(dirs["clf"])
    assert type(model).__name__ == "BloomForSequenceClassification"
    params = dict(model.named_parameters())
    for name in target_names(model, TARGETS):
        w = params[name].detach()
        assert ((w == 0).sum(1) == w.shape[1] // 2).all(), name  # Wanda: exact per output row
    assert torch.equal(params["score.weight"], dict(source.named_parameters())["score.weight"])  # head kept

    cfg = load_config("tiny-cpu", [*COMMON, *items])
    calib, evals = calibration_and_eval(cfg, prepare_data(cfg, tokenizer=load_tokenizer(str(dirs["clf"]))))
    assert calib.shape == (8, 32) and summary["eval_blocks"] == len(evals["labels"]) == 6  # 5% of 120
    for key, m in (("after", model), ("before", source)):
        got = eval_scores(m, evals, 4)
        assert summary[f"eval_accuracy_{key}"] == pytest.approx(got["eval_accuracy"])
        assert summary[f"eval_loss_{key}"] == pytest.approx(got["eval_loss"], rel=1e-5)
    card = (out / "README.md").read_text()
    assert "BLOOM classification model pruned" in card and "eval sentences" in card
    assert f"accuracy {100 * summary['eval_accuracy_before']:.2f}%" in card


def test_prune_refuses_a_classifier_whose_labels_are_not_the_datas(dirs, tmp_path: Path, capsys):
    data_file = tmp_path / "numeric.tsv"
    data_file.write_text("text\tlabel\n" + "".join(f"sentence number {i} here\t{i % 2}\n" for i in range(20)))
    items = ["task=classification", f"data.path={data_file}", "prune.method=wanda"]
    assert main(_argv(dirs["clf"], tmp_path / "o", items)) == 2
    err = capsys.readouterr().err
    assert "has labels {0: 'negative', 1: 'positive'} but data.path has {0: '0', 1: '1'}" in err
    assert "Traceback" not in err and not (tmp_path / "o").exists()
