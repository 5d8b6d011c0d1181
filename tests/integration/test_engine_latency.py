"""The ``decode_rel`` objective's measurement on real vLLM, in the Ray task a trial runs: a
sparse-packed export (expanded to dense, as vLLM serves it) against the search's dense reference,
the same request mix for both, rounds in ABBA order."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration


def test_engine_measures_a_sparse_export_against_the_dense_reference(tmp_path: Path, ray_local):
    from transformers import BloomConfig

    from bloomray.config import load_config
    from bloomray.data.tokenizer import train_tokenizer
    from bloomray.export.consolidate import write_model
    from bloomray.export.load import DENSE_DIR
    from bloomray.model.build import build_from_config
    from bloomray.tune.engine_latency import engine_measures, write_reference

    tok = train_tokenizer(
        [f"sample {i} of the engine mix" for i in range(200)], vocab_size=300, min_frequency=1
    )
    tok_dir = tmp_path / "tok"
    tok.save_pretrained(str(tok_dir))
    shape = BloomConfig(vocab_size=len(tok), hidden_size=128, n_layer=2, n_head=4)  # head size 32
    cfg = load_config(
        None,
        ["train.max_steps=1", "select.latency_batch=4", "select.latency_seq=8", "select.decode_tokens=8"],
    )
    reference = write_reference(cfg, tmp_path / "search", shape.to_dict(), tok_dir)
    assert write_reference(cfg, tmp_path / "search", shape.to_dict(), tok_dir) == reference  # written once
    model = build_from_config("causal_lm", shape, seed=1).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.ndim == 2 and ".h." in name:
                p.mul_((torch.rand_like(p) > 0.5).to(p.dtype))
    export = tmp_path / "export"
    export.mkdir()
    write_model(model, export, "magnitude")
    tok.save_pretrained(str(export))
    assert "bloomray_sparse" in json.loads((export / "config.json").read_text())

    got = engine_measures(cfg, str(export), reference, rounds=3)

    assert (export / DENSE_DIR / "config.json").is_file()  # vLLM ran the dense expansion
    assert got["decode_order"] == ["trial", "reference", "reference", "trial", "trial", "reference"]
    assert math.isfinite(got["decode_ms"]) and got["decode_ms"] > 0
    assert got["decode_rel"] == pytest.approx(got["decode_ms"] / got["decode_ms_reference"])
