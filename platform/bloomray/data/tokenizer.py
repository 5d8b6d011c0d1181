"""Tokenizers: load an HF tokenizer dir, or train a byte-level BPE on the corpus.

A trained tokenizer is saved as a fast tokenizer (``tokenizer.json``) with BLOOM's special
token layout (``<unk>``=0, ``<s>``=1, ``</s>``=2, ``<pad>``=3), so the export and the
server reload it with ``AutoTokenizer.from_pretrained``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from bloomray.errors import EXIT_USAGE, BloomrayError

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]


# A plain chat template for base models (no special tokens beyond EOS), saved with every
# tokenizer bloomray writes: it is the one the server's /v1/chat/completions applies.
PLAIN_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n"
    "{% else %}Assistant: {{ m['content'] }}{{ eos_token }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def ensure_chat_template(tok: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give a tokenizer without a chat template the plain one (a model's own template is kept)."""
    if not getattr(tok, "chat_template", None):
        tok.chat_template = PLAIN_CHAT_TEMPLATE
    return tok


class TokenizerError(BloomrayError, ValueError):
    """The tokenizer could not be loaded; the message says what to pass instead.

    Exit code 2: the tokenizer dir or hub name given is wrong or unreachable.
    """

    exit_code = EXIT_USAGE


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local dir (or a hub name when online).

    Raises:
        TokenizerError: the dir has no tokenizer, or a hub name cannot be reached.
    """
    local = Path(path).expanduser()
    try:
        tok = AutoTokenizer.from_pretrained(str(local) if local.exists() else path)
    except (OSError, ValueError) as exc:
        if local.exists():
            hint = "pass a directory holding tokenizer.json (a saved HF tokenizer)"
        else:
            hint = (
                "download it where you have network (huggingface-cli download NAME --local-dir DIR) "
                "and pass DIR"
            )
        where = "directory" if local.exists() else "hub name"
        raise TokenizerError(
            f"could not load a tokenizer from {where} {path!r} ({' '.join(str(exc).split())[:200]}); {hint}"
        ) from None
    if tok.pad_token is None:
        # BLOOM tokenizers define <pad>; others (GPT-2 style) reuse EOS for padding.
        tok.pad_token = tok.eos_token
    return ensure_chat_template(tok)


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, min_frequency: int = 2, extra_tokens: Sequence[str] = ()
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (every byte representable; no <unk> in practice).

    ``extra_tokens`` (the redaction placeholders) become whole tokens after the BLOOM
    specials' ids: left out of the BPE training text, added as normal (not special) tokens
    so they are one id each and survive ``decode(skip_special_tokens=True)``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if extra_tokens:
        extra = re.compile("|".join(map(re.escape, extra_tokens)))
        texts = (extra.sub("", t) for t in texts)

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        padding_side="left",  # generation pads on the left; training packs, so never pads
    )
    if extra_tokens:
        fast.add_tokens(list(extra_tokens))
    return ensure_chat_template(fast)
