"""Instruction fine-tuning data (``task: sft``): conversations -> right-padded, response-only labels.

Rows (JSONL, or any source :func:`~bloomray.data.corpus.read_rows` reads) are either
``{"prompt": ..., "response": ...}`` or OpenAI-style ``{"messages": [{"role": ..., "content": ...}]}``
ending with an assistant message. The format is detected per row; a row that is neither
follows ``data.bad_rows``.

Token for token what the server does: ``/v1/chat/completions`` (vLLM) renders the tokenizer's
chat template with ``add_generation_prompt=True`` and tokenizes that text without special
tokens, then generates. So an example is the ids of exactly that prompt text, followed by the
ids of the rest of the rendered conversation up to and including EOS, and only the latter are
labelled. Earlier assistant turns of a multi-turn conversation are context (not labelled).

One example per row, right-padded to the longest example (at most ``data.block_size``) with an
``attention_mask``: no example ever attends to another, and right padding leaves every real
position's causal context and ALiBi offsets exactly as if the example were alone. Examples
longer than ``data.block_size`` are dropped and counted (``dropped_too_long``), not truncated:
a cut prompt would train on a context the server never sees.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from bloomray.config import Config
from bloomray.data.corpus import DataError, Rows, read_rows
from bloomray.data.packing import ArrayBlocks, split_indices
from bloomray.data.prepare import PreparedData
from bloomray.data.redact import Redactor, placeholders, redaction_stats
from bloomray.data.tokenizer import ensure_chat_template, train_tokenizer

log = logging.getLogger(__name__)

IGNORE = -100  # the label transformers' cross-entropy skips
ROLES = ("system", "user", "assistant")
FORMAT_HINT = (
    'each row needs {"prompt": str, "response": str} or {"messages": [{"role": '
    '"system"|"user"|"assistant", "content": str}, ...]} ending with an assistant message'
)
Messages = list[dict[str, str]]


def read_conversations(source: str, policy: str) -> tuple[list[Messages], Rows]:
    """The conversations of a data source, one per good row (format detected per row).

    Args:
        source: file, folder, saved HF dataset or hub name (as ``data.path``).
        policy: ``data.bad_rows``: ``skip`` counts malformed rows, ``fail`` raises on the first.

    Returns:
        (conversations, rows) where rows carries the bad-row count and examples.

    Raises:
        DataError: unreadable source, a bad row with ``fail``, or no usable row at all.
    """
    try:
        rows = read_rows(source, "messages", policy)
    except DataError as exc:  # a CSV or HF dataset with prompt/response columns, not messages
        if "no column 'messages'" not in str(exc):
            raise
        rows = read_rows(source, "prompt", policy)
    out: list[Messages] = []
    for i, row in enumerate(rows.rows):
        messages, why = to_messages(row)
        if messages is None:
            rows.reject(rows.where(i, source), f"{why}; {FORMAT_HINT}", policy)
            continue
        out.append(messages)
    if not out:
        raise DataError(f"{source} has no usable instruction rows ({rows.bad} bad); {FORMAT_HINT}")
    return out, rows


def to_messages(row: dict[str, Any]) -> tuple[Messages | None, str]:
    """One row as a message list, or (None, why it is malformed)."""
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            return None, "'messages' must be a non-empty list"
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                return None, f"message {j} needs a role in {list(ROLES)} and a string content"
        if msgs[-1]["role"] != "assistant" or not msgs[-1]["content"].strip():
            return None, "the last message must be a non-empty assistant message (the trained response)"
        if not any(m["role"] == "user" for m in msgs):
            return None, "no user message"
        return [{"role": m["role"], "content": m["content"]} for m in msgs], ""
    prompt, response = row.get("prompt"), row.get("response")
    if not isinstance(prompt, str) or not prompt.strip():
        return None, "missing or empty 'prompt'"
    if not isinstance(response, str) or not response.strip():
        return None, "missing or empty 'response'"
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], ""


def encode_conversation(tok: PreTrainedTokenizerBase, messages: Messages) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of a conversation, as the server tokenizes and generates it.

    Args:
        tok: the tokenizer whose chat template renders the conversation.
        messages: the conversation; its last message is the assistant response to learn.

    Returns:
        The prompt is the chat template over all but the last message with the generation
        prompt; the response is the rest of the rendered conversation, cut after the first EOS
        (EOS appended when the template ends the turn without one), so generation learns to stop.

    Raises:
        DataError: the tokenizer's chat template does not render the generation prompt as a
            prefix of the full conversation (then no split can match serving).
    """
    prompt = tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise DataError(
            "the tokenizer's chat template renders the generation prompt "
            f"{prompt[-40:]!r} differently from the conversation {full[-60:]!r}: a prompt/response "
            "split cannot match serving; use a template whose generation prompt is a prefix"
        )
    # Separate calls, as at serving time: the prompt is tokenized alone, the response follows it.
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    rest = tok(full[len(prompt) :], add_special_tokens=False)["input_ids"]
    eos = tok.eos_token_id
    response = rest[: rest.index(eos) + 1] if eos in rest else [*rest, eos]
    return prompt_ids, response


def encode_examples(
    tok: PreTrainedTokenizerBase, conversations: list[Messages], block_size: int
) -> tuple[dict[str, np.ndarray], int]:
    """Right-padded ``input_ids``/``attention_mask``/``labels`` arrays, one example per row.

    Args:
        tok: the tokenizer (its chat template and ``pad_token_id`` are used).
        conversations: message lists, each ending with the assistant response.
        block_size: the longest example kept; longer ones are dropped.

    Returns:
        (arrays, dropped): the width is the longest kept example; labels are the response
        token ids and ``-100`` on the prompt and the padding.

    Raises:
        DataError: no example fits ``block_size``.
    """
    pairs = [encode_conversation(tok, m) for m in conversations]
    kept = [(p, r) for p, r in pairs if len(p) + len(r) <= block_size]
    if not kept:
        shortest = min(len(p) + len(r) for p, r in pairs)
        raise DataError(
            f"all {len(pairs)} instruction examples are longer than data.block_size={block_size} "
            f"tokens (the shortest has {shortest}); raise data.block_size"
        )
    width = max(len(p) + len(r) for p, r in kept)
    ids = np.full((len(kept), width), tok.pad_token_id, dtype=np.int32)
    mask = np.zeros((len(kept), width), dtype=np.int8)
    labels = np.full((len(kept), width), IGNORE, dtype=np.int32)
    for i, (p, r) in enumerate(kept):
        n = len(p) + len(r)
        ids[i, :n] = p + r
        mask[i, :n] = 1
        labels[i, len(p) : n] = r
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}, len(pairs) - len(kept)


def _train_on_rendered(
    conversations: list[Messages], vocab_size: int, min_frequency: int, extra_tokens: list[str]
) -> Any:
    """A byte-level BPE trained on the conversations as its chat template renders them.

    A first BPE on the message text only carries the template (every trained tokenizer gets
    the plain one); the second learns the template's own words ("User:", "Assistant:") too,
    which keeps examples short. EOS is left out: BPE training would split it into characters.
    ``extra_tokens`` (redaction placeholders) are added whole to the final tokenizer.
    """
    draft = train_tokenizer([m["content"] for c in conversations for m in c], vocab_size, min_frequency)
    rendered = [
        draft.apply_chat_template(c, tokenize=False).replace(draft.eos_token, "") for c in conversations
    ]
    return train_tokenizer(rendered, vocab_size, min_frequency, extra_tokens)


def prepare_sft(cfg: Config, tok: PreTrainedTokenizerBase | None) -> PreparedData:
    """Train/eval arrays for ``task: sft`` plus the tokenizer, its chat template set.

    Args:
        cfg: the run config (``data.path``, ``data.eval_path`` or ``data.eval_fraction``,
            ``data.block_size``, ``data.bad_rows``, ``data.max_documents``).
        tok: the run's tokenizer, or None to train a byte-level BPE on the training text.

    Returns:
        The prepared data; ``stats`` records bad rows and dropped over-long examples.

    Raises:
        DataError: no ``data.path``, malformed rows with ``fail``, too few or too long examples.
    """
    d = cfg.data
    if d.path is None:
        raise DataError(f"task=sft needs data.path: a JSONL file where {FORMAT_HINT}")
    convs, rows = read_conversations(d.path, d.bad_rows)
    convs = convs[: d.max_documents] if d.max_documents else convs
    if d.eval_path:
        eval_convs, erows = read_conversations(d.eval_path, d.bad_rows)
        rows.bad += erows.bad
        rows.bad_examples += erows.bad_examples[: 5 - len(rows.bad_examples)]
    else:
        if len(convs) < 2:
            raise DataError(f"{d.path}: {len(convs)} usable example; need at least 2 to hold one out")
        tr, ev = split_indices(len(convs), d.eval_fraction, d.seed)
        convs, eval_convs = [convs[i] for i in tr], [convs[i] for i in ev]
    redact = Redactor.from_config(d.redact)
    if redact:  # every message, system and earlier turns included, before any tokenizer sees it
        convs, eval_convs = [redact.messages(c) for c in convs], [redact.messages(c) for c in eval_convs]
    tok = ensure_chat_template(
        tok
        or _train_on_rendered(convs, d.tokenizer.vocab_size, d.tokenizer.min_frequency, placeholders(redact))
    )
    train, dropped = encode_examples(tok, convs, d.block_size)
    evald, eval_dropped = encode_examples(tok, eval_convs, d.block_size)
    if rows.bad:
        log.warning("skipped %d bad rows, e.g. %s", rows.bad, rows.bad_examples[:3])
    if dropped or eval_dropped:
        log.warning(
            "dropped %d examples longer than data.block_size=%d", dropped + eval_dropped, d.block_size
        )
    stats = {
        "source": d.path,
        "train_examples": len(train["input_ids"]),
        "eval_examples": len(evald["input_ids"]),
        "bad_rows": rows.bad,
        "bad_row_examples": rows.bad_examples,
        "dropped_too_long": dropped + eval_dropped,
        "block_size": d.block_size,
        "seq_len": int(train["input_ids"].shape[1]),
        "train_response_tokens": int((train["labels"] != IGNORE).sum()),
        "vocab_size": len(tok),
        **redaction_stats(redact),
    }
    return PreparedData(tok, ArrayBlocks(train), ArrayBlocks(evald), None, stats)
