"""Causal-LM corpora as token dataset dirs: build one (``bloomray prepare-data`` on Ray Data,
or a run's own raw input in process), or open a prepared one and check it fits the run."""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from bloomray.config import Config, ConfigError
from bloomray.data.ingest import write_dataset
from bloomray.data.redact import Redactor, placeholders
from bloomray.data.remote import display_uri, is_remote
from bloomray.data.shards import DEFAULT_SHARD_TOKENS, TokenDataset, is_token_dataset, token_dtype
from bloomray.data.sources import EncodeSettings, list_units, redact_arguments, sample_texts
from bloomray.data.tokenizer import configured_tokenizer, load_tokenizer, require_same_vocab, train_tokenizer


def encode_settings(cfg: Config, tokenizer_dir: Path) -> EncodeSettings:
    """The per-unit encoding settings of ``cfg.data`` with the tokenizer saved at ``tokenizer_dir``."""
    d = cfg.data
    return EncodeSettings(
        str(tokenizer_dir), d.text_column, d.bad_rows, d.eval_fraction, d.seed, redact_arguments(d.redact)
    )


def build_dataset(
    cfg: Config,
    tok: PreTrainedTokenizerBase | None,
    out: Path,
    workers: int = 0,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    progress: bool = False,
) -> TokenDataset:
    """Tokenize ``data.path`` (and ``data.eval_path``) into the dataset dir ``out``.

    What ``bloomray prepare-data`` runs (at most ``workers`` Ray Data tasks at a time) and what a run does for raw
    input (``workers=0``, into ``OUTPUT/data``). Without a tokenizer (a model built from a
    preset) a byte-level BPE is trained on the first ``data.max_documents`` documents (all when
    unset), as it always was.
    """
    d = cfg.data
    units = list_units(d.path)
    if d.eval_path:  # every document of data.path trains, every one of data.eval_path evaluates
        units = [replace(u, split="train") for u in units] + [
            replace(u, split="eval") for u in list_units(d.eval_path)
        ]
    with tempfile.TemporaryDirectory() as tmp:
        if tok is None:
            settings = encode_settings(cfg, Path(tmp))
            train_units = [u for u in units if u.split != "eval"]
            tok = train_tokenizer(
                sample_texts(train_units, settings, d.max_documents),
                d.tokenizer.vocab_size,
                d.tokenizer.min_frequency,
                placeholders(Redactor.from_config(d.redact)),
            )
        tok.save_pretrained(tmp)
        return write_dataset(
            units, tok, out, encode_settings(cfg, Path(tmp)), workers, d.max_documents, shard_tokens, progress
        )


def prepare_dataset_dir(
    cfg: Config, out: Path, workers: int | None = None, shard_mb: int = 256, overwrite: bool = False
) -> TokenDataset:
    """``bloomray prepare-data``: tokenize ``data.path`` on Ray Data into the dataset dir ``out``.

    Args:
        workers: tokenizer tasks at a time; None uses every CPU of the cluster (Ray is started or joined
            per ``ray.address``).
        shard_mb: the size of one shard file.
        overwrite: replace a dataset already at ``out`` (anything else there is never touched).

    Raises:
        ConfigError: ``out`` holds something that is not a dataset, or a dataset without ``overwrite``.
    """
    import ray

    from bloomray.raycluster import init_ray

    out = out.expanduser().resolve()
    if out.exists() and not (overwrite and is_token_dataset(out)):
        what = (
            "a prepared dataset; pass --overwrite to replace it"
            if is_token_dataset(out)
            else ("files that are not a prepared dataset; choose another --output")
        )
        raise ConfigError(f"{out} already exists and holds {what}")
    if is_remote(cfg.data.path):
        raise ConfigError(
            f"data.path={display_uri(str(cfg.data.path))}: prepare-data reads local files; copy the "
            "corpus to a local or shared mount first (a URI is read as a prepared dataset only)"
        )
    if is_token_dataset(cfg.data.path):
        raise ConfigError(f"data.path={cfg.data.path} is already a prepared dataset; train on it directly")
    tok = configured_tokenizer(cfg)  # a wrong tokenizer stops here, before any worker starts
    init_ray(cfg.ray.address, cfg.ray.num_cpus)
    n = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    shard_tokens = (
        shard_mb * (1 << 20) // token_dtype(len(tok) if tok else cfg.data.tokenizer.vocab_size).itemsize
    )
    return build_dataset(cfg, tok, out, workers=n, shard_tokens=shard_tokens, progress=True)


def open_prepared(cfg: Config, tok: PreTrainedTokenizerBase | None) -> TokenDataset:
    """The prepared dataset at ``data.path``, checked against the run's tokenizer.

    Raises:
        ConfigError: ``data.eval_path`` is set (a prepared dataset carries its own split).
        TokenizerError: the run's tokenizer (a pretrained model's) is not the one that made the ids.
    """
    d = cfg.data
    if d.eval_path:
        raise ConfigError(
            f"data.path={d.path} is a prepared dataset with its own eval split; leave data.eval_path "
            "unset, or give the eval file to `bloomray prepare-data` instead"
        )
    ds = TokenDataset.open(d.path)
    if tok is not None:
        own = load_tokenizer(str(ds.tokenizer_dir))
        require_same_vocab(
            tok,
            own,
            f"data.path={d.path} was tokenized with another tokenizer ({len(own)} tokens) than "
            f"the run's ({len(tok)} tokens); prepare it again with this model's tokenizer "
            "(`bloomray prepare-data --config` with the same model.path)",
        )
    return ds


def scratch_dir() -> Path:
    """A temp dir for a dataset prepared without a run dir (tests, notebooks), removed at exit."""
    tmp = tempfile.TemporaryDirectory(prefix="bloomray-data-")
    _SCRATCH.append(tmp)
    return Path(tmp.name) / "data"


_SCRATCH: list[tempfile.TemporaryDirectory] = []
