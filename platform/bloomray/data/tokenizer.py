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

from bloomray.config import Config
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


def configured_tokenizer(cfg: Config) -> PreTrainedTokenizerBase | None:
    """The run's tokenizer when it is loaded, not trained; None when one must be trained.

    A pretrained model (``model.path``, a dir or hub name) keeps its own tokenizer, loaded from
    the same place unless ``data.tokenizer.path`` names another copy of it. A byte-level BPE is
    trained on the corpus only for models built from a preset without ``data.tokenizer.path``.
    Called before the corpus is read, so a wrong tokenizer stops the run at once.

    Raises:
        TokenizerError: no tokenizer at ``model.path``, or ``data.tokenizer.path`` holds a
            tokenizer that is not the model's own.
    """
    tcfg, model_path = cfg.data.tokenizer, cfg.model.path
    if model_path is None:
        return load_tokenizer(tcfg.path) if tcfg.path else None
    if tcfg.path is None:
        local = Path(model_path).expanduser()
        if local.is_dir() and not _has_tokenizer(local):
            raise TokenizerError(
                f"model.path={model_path} has no tokenizer files (tokenizer.json or tokenizer_config.json); "
                "a pretrained model needs its own tokenizer: set data.tokenizer.path to it"
            )
        return load_tokenizer(model_path)
    tok = load_tokenizer(tcfg.path)
    local = Path(model_path).expanduser()
    if not local.is_dir() or _has_tokenizer(local):  # the model's own copy is there to compare with
        own = load_tokenizer(model_path)
        require_same_vocab(
            tok,
            own,
            f"data.tokenizer.path={tcfg.path} ({len(tok)} tokens) is not the tokenizer of "
            f"model.path={model_path} ({len(own)} tokens): their vocabularies differ, so every id "
            "would mean another token. Leave data.tokenizer.path unset to use the model's own",
        )
    return tok


def require_same_vocab(tok: PreTrainedTokenizerBase, own: PreTrainedTokenizerBase, mismatch: str) -> None:
    """Raise :class:`TokenizerError` with ``mismatch`` (what differs and what to do) unless ``tok``
    gives every token the id ``own`` gives it."""
    if tok.get_vocab() != own.get_vocab():
        raise TokenizerError(mismatch)


def _has_tokenizer(model_dir: Path) -> bool:
    return any((model_dir / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
