"""Instruction fine-tuning (task: sft) on real Ray + DeepSpeed, checked through the chat template.

The synthetic task is customer-service shaped: an intent (track/cancel/return), an item and a
customer name in the prompt; a reply naming both. Held-out prompts are unseen (intent, item,
name) combinations, so exact matches need the model to pick the reply by intent and copy the
right item and name, not recall a training pair. (Reversing word lists, the obvious toy task,
takes a 2-layer ALiBi model thousands of steps: position lookups are what ALiBi makes hard.)
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bloomray.config import load_config
from bloomray.data.tokenizer import PLAIN_CHAT_TEMPLATE
from bloomray.export.run import run_training
from bloomray.model.build import PRESETS

pytestmark = pytest.mark.integration

NAMES = "anna ben cara dan eva finn gus hana".split()
ITEMS = "lamp desk sofa chair rug shelf bed clock".split()
REPLIES = {
    "track": "{n}, your {i} ships today.",
    "cancel": "{n}, your {i} order is cancelled.",
    "return": "{n}, please send the {i} back.",
}
SYSTEM = "You are the shop's support assistant."
# Measured without Ray (same data, fp32, batch 32, lr 1e-2 decaying linearly): held-out exact
# match 0.78-1.0 over 4 seeds at 250 steps, 1.0 at 300; the loss drops suddenly once the copy
# is learned. Through Ray on an AMD EPYC box (2026-12-03) 300 steps gave 0.78 (the copy was
# learned late), so 400: a run late by 100 steps still passes. The step-addressed batches of
# 2026-12-04 (another, equally random example order) gave 0.72 at 400 here, so 500.
STEPS = 500
EXACT_MATCH = 0.8
# vLLM's CPU attention needs a head size of 32 or more: the tiny preset's 4 heads of 16 become
# 2 heads of 32 here (only the driver reads presets; workers and export use the recorded config).
SERVABLE_TINY = {"hidden_size": 64, "n_layer": 2, "n_head": 2}


def conversation(intent: str, item: str, name: str) -> list[dict[str, str]]:
    system = [{"role": "system", "content": SYSTEM}] if SYSTEM else []
    return [
        *system,
        {"role": "user", "content": f"{intent} my {item} order, I am {name}"},
        {"role": "assistant", "content": REPLIES[intent].format(n=name, i=item)},
    ]


def write_task(root: Path) -> tuple[Path, Path, list[list[dict[str, str]]]]:
    """Train/held-out JSONL in both row formats (plus 2 malformed rows); returns the held-out set."""
    combos = list(itertools.product(REPLIES, ITEMS, NAMES))
    random.Random(0).shuffle(combos)
    held_out, train = combos[:32], combos[32:]
    lines = []
    for k, combo in enumerate(train):
        conv = conversation(*combo)
        if k % 2:  # half OpenAI-style messages, half prompt/response pairs (no system prompt)
            lines.append({"messages": conv})
        else:
            lines.append({"prompt": conv[-2]["content"], "response": conv[-1]["content"]})
    lines[5:5] = [{"prompt": "track my lamp order"}, {"messages": [{"role": "user", "content": "hi"}]}]
    train_path, eval_path = root / "train.jsonl", root / "eval.jsonl"
    train_path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    evals = [conversation(*c) for c in held_out]
    eval_path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in evals))
    return train_path, eval_path, evals


def greedy_replies(model_dir: Path, conversations: list[list[dict[str, str]]]) -> list[str | None]:
    """The export's greedy reply to each conversation (all turns but the last) through its chat
    template; None where generation did not end with EOS within 48 tokens."""
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    replies: list[str | None] = []
    for conv in conversations:
        # What /v1/chat/completions does: render the saved template, tokenize without specials.
        prompt = tok.apply_chat_template(conv[:-1], tokenize=False, add_generation_prompt=True)
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(
                **ids,
                max_new_tokens=48,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
        new = out[0, ids["input_ids"].shape[1] :]
        ended = new[-1].item() == tok.eos_token_id
        replies.append(tok.decode(new, skip_special_tokens=True).strip() if ended else None)
    return replies


def exact_match(replies: list[str | None], conversations: list[list[dict[str, str]]]) -> float:
    return sum(r == c[-1]["content"] for r, c in zip(replies, conversations, strict=True)) / len(
        conversations
    )


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, ray_local) -> dict[str, Any]:
    """A full fine-tune under ZeRO-2 on the task, its export and the export's greedy replies."""
    root = tmp_path_factory.mktemp("sft")
    train_path, eval_path, held_out = write_task(root)
    cfg = load_config(
        "sft",
        [
            "model.preset=tiny",
            f"data.path={train_path}",
            f"data.eval_path={eval_path}",
            "data.block_size=64",
            "data.tokenizer.vocab_size=400",
            "train.epochs=null",
            f"train.max_steps={STEPS}",
            "train.global_batch_size=32",
            "train.micro_batch_size=16",
            "train.lr=1e-2",
            "train.log_every=50",
            f"train.eval_every={STEPS}",
            f"train.checkpoint_every={STEPS}",
            "deepspeed.zero_stage=2",
            "deepspeed.precision=fp32",  # bf16 is emulated on most CPUs: fp32 is ~3x faster here
        ],
    )
    out = root / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(PRESETS, "tiny", SERVABLE_TINY)
        summary = run_training(cfg, out)
    replies = greedy_replies(out / "model", held_out)
    return {
        "root": root,
        "paths": (train_path, eval_path),
        "held_out": held_out,
        "summary": summary,
        "model_dir": out / "model",
        "replies": replies,
    }


def test_sft_learns_held_out_replies(sft_run):
    summary, model_dir = sft_run["summary"], sft_run["model_dir"]
    assert summary["task"] == "sft" and summary["data"]["bad_rows"] == 2
    assert summary["data"]["train_examples"] == 160 and summary["data"]["eval_examples"] == 32
    assert summary["eval_loss"] < 0.2 < 2 < summary["initial_eval_loss"], summary
    exported = json.loads((model_dir / "config.json").read_text())
    assert exported["architectures"] == ["BloomForCausalLM"]
    assert exported["hidden_size"] // exported["n_head"] == 32
    assert AutoTokenizer.from_pretrained(str(model_dir)).chat_template == PLAIN_CHAT_TEMPLATE
    assert "/v1/chat/completions" in (model_dir / "README.md").read_text()
    rate = exact_match(sft_run["replies"], sft_run["held_out"])
    print(f"sft: eval_loss {summary['eval_loss']:.4f}, held-out exact match {rate:.3f}")
    assert rate >= EXACT_MATCH, rate


def test_the_served_export_answers_through_its_chat_template(sft_run, tmp_path):
    """/v1/chat/completions on the vLLM engine gives the export's own greedy replies (fp32)."""
    from ray import serve

    from bloomray.raycluster import free_port
    from bloomray.serving.auth import ENV_FILE, ENV_KEYS, write_key_file
    from bloomray.serving.run import start_server

    key = "sft-test-key-0123456789"
    # A Serve left running (another module's apps and proxy) keeps its first HTTP port and
    # would ignore the free port below: start from none, as test_serve.py's server leaves it.
    serve.shutdown()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(ENV_FILE, str(write_key_file(tmp_path / "keys", [key])))
        mp.delenv(ENV_KEYS, raising=False)
        url = start_server(
            {"support": str(sft_run["model_dir"])},
            port=free_port(),
            name="sft",
            overrides={
                "dtype": "float32",
                "kv_cache_gib": 1,
                "cpus_per_engine": 1,
                "engine_deployment": {"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}},
            },
        )
    try:

        async def ask_all() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=120, headers={"Authorization": f"Bearer {key}"}) as client:
                return await asyncio.gather(
                    *(
                        client.post(
                            f"{url}/v1/chat/completions",
                            json={
                                "model": "support",
                                "messages": conv[:-1],
                                "max_tokens": 48,
                                "temperature": 0,
                            },
                        )
                        for conv in sft_run["held_out"]
                    )
                )

        responses = asyncio.run(ask_all())
    finally:
        serve.shutdown()  # the app and Serve's proxy: a later module starts Serve on its own port
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    choices = [r.json()["choices"][0] for r in responses]
    served = [c["message"]["content"].strip() if c["finish_reason"] == "stop" else None for c in choices]
    assert served == sft_run["replies"]
    assert exact_match(served, sft_run["held_out"]) >= EXACT_MATCH


def test_lora_zero3_continues_from_the_export(sft_run):
    """LoRA adapters on the export, ZeRO-3: the model's own tokenizer and template are kept,
    a few steps leave the held-out loss low, and the export merges the adapters."""
    train_path, eval_path = sft_run["paths"]
    model_dir, root, summary = sft_run["model_dir"], sft_run["root"], sft_run["summary"]
    lora = load_config(
        "sft",
        [
            f"data.path={train_path}",
            f"data.eval_path={eval_path}",
            f"model.path={model_dir}",
            "model.lora.enabled=true",
            "model.lora.r=4",
            "train.epochs=null",
            "train.max_steps=4",
            "train.lr=1e-4",
            "train.warmup_steps=0",
            "deepspeed.zero_stage=3",
            "deepspeed.precision=fp32",
        ],
    )
    tuned = run_training(lora, root / "lora")
    assert tuned["eval_loss"] < 2 * summary["eval_loss"] + 0.05, tuned
    assert tuned["data"]["seq_len"] == summary["data"]["seq_len"]  # same tokenizer, same tokens
    names = AutoModelForCausalLM.from_pretrained(str(root / "lora" / "model")).state_dict().keys()
    assert not [n for n in names if "lora" in n]
    assert AutoTokenizer.from_pretrained(str(root / "lora" / "model")).chat_template == PLAIN_CHAT_TEMPLATE
