"""The end-to-end demo on the embedded corpus (``bloomray demo`` / ``make demo``)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from bloomray.config import load_config
from bloomray.train.run import run_training


def run_demo(output: Path, overrides: list[str] | None = None) -> dict:
    """Pretrain the tiny-cpu preset on the embedded corpus and show what came out.

    The output dir is replaced on every run, so ``make demo`` can be run again.
    """
    output = output.expanduser().resolve()
    if output.exists():
        shutil.rmtree(output)
    cfg = load_config("tiny-cpu", overrides)
    start = time.time()
    print(
        f"[demo] pretraining BLOOM ({cfg.model.preset}) on the embedded corpus with "
        f"{cfg.scaling.num_workers} Ray Train workers, DeepSpeed ZeRO-{cfg.deepspeed.zero_stage} "
        f"{cfg.deepspeed.precision}, {cfg.train.max_steps} steps ...",
        flush=True,
    )
    summary = run_training(cfg, output / "pretrain")
    took = time.time() - start
    _generate_sample(Path(summary["model_dir"]))
    print(json.dumps({k: v for k, v in summary.items() if k != "data"}, indent=2))
    print(f"[demo] done in {took:.0f}s. Artifacts:")
    print(f"  model (HF dir):   {summary['model_dir']}")
    print(f"  summary:          {output / 'pretrain' / 'summary.json'}")
    print(f"  checkpoints:      {output / 'pretrain' / 'checkpoints'}")
    print(f"  logs:             {output / 'pretrain' / 'logs'}  (tensorboard --logdir ...)")
    return summary


def _generate_sample(model_dir: Path, prompt: str = "The for statement") -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    ids = tok(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=30, do_sample=False, pad_token_id=tok.pad_token_id)
    print(f"[demo] sample (greedy): {tok.decode(out[0], skip_special_tokens=True)!r}")
