"""Baseline (a) of benchmarks/serve_throughput.py: the FastAPI + transformers server a user would write.

    PLAIN_SERVER_MODEL=DIR PLAIN_SERVER_DTYPE=float32 OMP_NUM_THREADS=2 .venv/bin/python -m uvicorn \
        _plain_server:app --app-dir benchmarks --host 127.0.0.1 --port PORT

One uvicorn process, the model loaded once at import (``PLAIN_SERVER_DTYPE``: float32, the
default, or bfloat16), and a plain ``def`` endpoint calling ``model.generate`` for one prompt:
FastAPI runs ``def`` endpoints in its thread pool, which is what its docs recommend for
blocking code. No batching, no streaming, no auth, no queue limit, no lock (each ``generate``
call serves exactly one request; concurrent requests run concurrent ``generate`` calls in the
pool's threads, sharing the cores). ``ignore_eos`` works like vLLM's extension: the EOS token
is suppressed until ``max_tokens`` are generated (``min_new_tokens = max_new_tokens``), so the
completion is exactly ``max_tokens`` long.
"""

from __future__ import annotations

import os

import torch
from fastapi import FastAPI
from pydantic import BaseModel
from transformers import AutoModelForCausalLM, AutoTokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MODEL_DIR = os.environ["PLAIN_SERVER_MODEL"]
DTYPE = DTYPES[os.environ.get("PLAIN_SERVER_DTYPE", "float32")]
tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=DTYPE).eval()
app = FastAPI()


class Completion(BaseModel):
    prompt: str
    max_tokens: int = 16
    temperature: float = 0.0
    ignore_eos: bool = False  # vLLM's extension: generate exactly max_tokens


@app.get("/health")
def health() -> dict[str, str]:
    return {"status": "ok"}


@app.post("/v1/completions")
def completions(req: Completion) -> dict:
    inputs = tokenizer(req.prompt, return_tensors="pt", add_special_tokens=False)
    sampling = (
        {"do_sample": True, "temperature": req.temperature} if req.temperature > 0 else {"do_sample": False}
    )
    if req.ignore_eos:
        sampling["min_new_tokens"] = req.max_tokens  # EOS is masked until max_tokens are out
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=req.max_tokens, pad_token_id=tokenizer.pad_token_id, **sampling
        )
    prompt_len = inputs["input_ids"].shape[1]
    new = out[0, prompt_len:]
    text = tokenizer.decode(new, skip_special_tokens=True)
    finished = tokenizer.eos_token_id is not None and tokenizer.eos_token_id in new.tolist()
    completion = len(new) - int(finished)  # the EOS token that ended it is not a completion token
    return {
        "object": "text_completion",
        "choices": [{"index": 0, "text": text, "finish_reason": "stop" if finished else "length"}],
        "usage": {
            "prompt_tokens": prompt_len,
            "completion_tokens": completion,
            "total_tokens": prompt_len + completion,
        },
    }
