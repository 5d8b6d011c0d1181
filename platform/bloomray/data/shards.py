"""Token datasets on disk: memory-mapped token shards plus a small JSON index.

A dataset dir (what ``bloomray prepare-data`` writes, and what a run prepares on the fly
into ``OUTPUT/data``) holds, per split (``train``, ``eval``):

- ``{split}-{k:05d}.bin``: the split's token stream, raw little-endian ``uint16`` (vocabulary
  up to 65,536) or ``uint32``; each document's tokens followed by EOS, documents in input
  order, cut into shards of at most ``shard_tokens`` tokens;
- ``{split}-docs.bin``: raw int64 document start offsets into that stream (``documents + 1``
  of them, the last is the token count), streamed to disk so billions of documents fit;

and ``index.json`` (format, dtype, per-shard token counts and sha256, documents and tokens
per split, per-source documents / bad rows, tokenizer hash, source fingerprint, split rule)
and ``tokenizer/`` (the tokenizer that made the ids). Blocks are cut when training reads
them (:class:`TokenBlocks`), so one dataset serves any ``data.block_size``.

Readers map the shards (``numpy.memmap``): nothing is loaded until a block is read, and the
memory a worker uses does not grow with the corpus. A shard whose size does not match the
index (truncated, or rewritten) is a :class:`DataError` naming the file; :meth:`verify`
checks every shard's sha256.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from bloomray.data.corpus import DataError
from bloomray.data.mapped import map_for_random_reads, release
from bloomray.files import atomic_write_text

FORMAT = "bloomray-tokens"
VERSION = 1
INDEX = "index.json"
SPLITS = ("train", "eval")
DEFAULT_SHARD_TOKENS = 1 << 27  # 128 Mi tokens: 256 MiB of uint16 per shard


def token_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` when every id fits, else ``uint32``."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def is_token_dataset(path: str | Path | None) -> bool:
    """True when ``path`` is a dataset dir written by this module, or a URI (``s3://`` ...: only a
    prepared dataset is read from one; :meth:`TokenDataset.open` checks it, ``data/remote.py``)."""
    from bloomray.data.remote import is_remote  # remote.py imports this module

    if path is None or is_remote(path):
        return is_remote(path)
    index = Path(path).expanduser() / INDEX
    if not index.is_file():
        return False
    try:
        return json.loads(index.read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


class _SplitWriter:
    def __init__(self, out: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.out, self.split, self.dtype, self.shard_tokens = out, split, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self.tokens = 0
        self.documents = 0
        self._offsets = (out / f"{split}-docs.bin").open("wb")  # int64 starts, streamed to disk
        self._offsets.write(np.zeros(1, dtype="<i8").tobytes())
        self._fh: Any = None
        self._hash: Any = None
        self._in_shard = 0

    def add_many(self, ids: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents given as their concatenated ids (EOS included) and their lengths."""
        data = np.ascontiguousarray(ids, dtype=self.dtype)
        pos = 0
        while pos < len(data):
            if self._fh is None or self._in_shard == self.shard_tokens:
                self._roll()
            take = min(len(data) - pos, self.shard_tokens - self._in_shard)
            chunk = data[pos : pos + take].tobytes()
            self._fh.write(chunk)
            self._hash.update(chunk)
            self._in_shard += take
            pos += take
        ends = self.tokens + np.cumsum(lengths, dtype=np.int64)
        self._offsets.write(ends.astype("<i8").tobytes())
        self.tokens += len(data)
        self.documents += len(lengths)

    def _roll(self) -> None:
        self._close_shard()
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self._fh, self._hash, self._in_shard = (self.out / name).open("wb"), hashlib.sha256(), 0
        self.shards.append({"file": name})

    def _close_shard(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self.shards[-1].update(tokens=self._in_shard, sha256=self._hash.hexdigest())
            self._fh = None

    def close(self) -> dict[str, Any]:
        self._close_shard()
        self._offsets.close()
        return {
            "documents": self.documents,
            "tokens": self.tokens,
            "shards": self.shards,
            "doc_offsets": f"{self.split}-docs.bin",
        }


class ShardWriter:
    """Stream documents' token ids into a dataset dir (which the caller makes atomic)."""

    def __init__(self, out: Path, vocab_size: int, shard_tokens: int = DEFAULT_SHARD_TOKENS) -> None:
        self.out = out
        self.dtype = token_dtype(vocab_size)
        self.splits = {s: _SplitWriter(out, s, self.dtype, shard_tokens) for s in SPLITS}

    def add(self, split: str, ids: np.ndarray) -> None:
        """One document (EOS appended) into ``split``."""
        self.splits[split].add_many(ids, np.array([len(ids)]))

    def add_many(self, split: str, ids: np.ndarray, lengths: np.ndarray) -> None:
        """Documents (concatenated, EOS appended to each) and their lengths into ``split``."""
        self.splits[split].add_many(ids, lengths)

    def close(self, meta: dict[str, Any]) -> dict[str, Any]:
        """Write the doc offsets and ``index.json`` (``meta`` merged in); returns the index."""
        splits = {s: w.close() for s, w in self.splits.items()}
        h = hashlib.sha256(self.dtype.str.encode())
        for s in SPLITS:
            h.update(s.encode())
            for shard in splits[s]["shards"]:
                h.update(shard["sha256"].encode())
        index = {
            "format": FORMAT,
            "version": VERSION,
            "dtype": self.dtype.str,
            **meta,
            "splits": splits,
            "fingerprint": h.hexdigest(),
        }
        atomic_write_text(self.out / INDEX, json.dumps(index, indent=1) + "\n")
        return index


@dataclass(frozen=True)
class TokenDataset:
    """An opened dataset dir (index read and checked; shards mapped lazily by its blocks)."""

    path: Path  # local: a remote dataset's copy on this node
    index: dict[str, Any] = field(repr=False)
    source: str | None = None  # the URI it was opened from, for a remote one

    @classmethod
    def open(cls, path: str | Path) -> TokenDataset:
        """Open ``path`` (a URI: this node's copy, ``data/remote.py``), checking that every shard
        is there with the size the index gives.

        Raises:
            DataError: no index, another format or version, a missing or truncated shard.
        """
        from bloomray.data.remote import is_remote, local_dataset_dir  # remote.py imports this module

        root = local_dataset_dir(path).resolve()
        try:
            index = json.loads((root / INDEX).read_text())
        except (OSError, ValueError) as exc:
            raise DataError(
                f"{root} is not a prepared dataset ({INDEX}: {exc}); make one with `bloomray prepare-data`"
            ) from None
        if index.get("format") != FORMAT or index.get("version") != VERSION:
            raise DataError(
                f"{root / INDEX} is format {index.get('format')!r} v{index.get('version')}, not "
                f"{FORMAT!r} v{VERSION}; prepare it again with `bloomray prepare-data`"
            )
        ds = cls(root, index, str(path) if is_remote(path) else None)
        item = np.dtype(index["dtype"]).itemsize
        for split in SPLITS:
            for shard in index["splits"][split]["shards"]:
                f = root / shard["file"]
                want = shard["tokens"] * item
                size = f.stat().st_size if f.exists() else None
                if size != want:
                    got = "missing" if size is None else f"{size} bytes"
                    raise DataError(
                        f"token shard {f} is {got}, the index says {want} bytes (truncated or "
                        "replaced); prepare the dataset again with `bloomray prepare-data`"
                    )
        return ds

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / "tokenizer"

    def tokens(self, split: str) -> int:
        return int(self.index["splits"][split]["tokens"])

    def documents(self, split: str) -> int:
        return int(self.index["splits"][split]["documents"])

    def doc_offsets(self, split: str) -> np.ndarray:
        """The split's document start offsets (memory-mapped; ``documents + 1`` of them)."""
        return np.memmap(self.path / self.index["splits"][split]["doc_offsets"], dtype="<i8", mode="r")

    def blocks(self, split: str, block_size: int) -> TokenBlocks:
        """The split cut into ``block_size``-token blocks (the tail is dropped)."""
        root = self.source or self.path  # a worker on another node opens its own copy of a URI
        return TokenBlocks(root, split, block_size, self.tokens(split), self.index["dtype"], self)

    def verify(self) -> None:
        """Check every shard's sha256 against the index.

        Raises:
            DataError: naming the first shard whose contents changed.
        """
        for split in SPLITS:
            for shard in self.index["splits"][split]["shards"]:
                h = hashlib.sha256()
                with (self.path / shard["file"]).open("rb") as fh:
                    while chunk := fh.read(1 << 24):
                        h.update(chunk)
                if h.hexdigest() != shard["sha256"]:
                    raise DataError(
                        f"token shard {self.path / shard['file']} is corrupt (sha256 differs from "
                        f"{INDEX}); prepare the dataset again with `bloomray prepare-data`"
                    )


class BlockSource(Protocol):
    """Training examples addressed by index: what ``train/batches.py`` reads from."""

    def __len__(self) -> int: ...

    def take(self, idx: np.ndarray) -> dict[str, np.ndarray]: ...

    def fingerprint(self) -> str: ...


class TokenBlocks:
    """``input_ids`` blocks of one split, read from the memory-mapped shards.

    Pickles as its path (or URI) and shape only (cheap to send to every worker); the dataset is
    opened (a URI copied to the node, once) and the shards are mapped on first use in each process.
    """

    def __init__(
        self,
        root: Path | str,
        split: str,
        block_size: int,
        tokens: int,
        dtype: str,
        dataset: TokenDataset | None = None,
    ) -> None:
        self.root, self.split, self.block_size = root, split, block_size  # root: a path, or a URI
        self.n_tokens, self.dtype = tokens, dtype
        self._dataset = dataset  # ``root`` opened; not pickled: opened once in each process
        self._maps: list[np.memmap] | None = None
        self._starts: np.ndarray | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_dataset": None, "_maps": None, "_starts": None}

    def __len__(self) -> int:
        return self.n_tokens // self.block_size

    def _index(self) -> dict[str, Any]:
        if self._dataset is None:
            self._dataset = TokenDataset.open(self.root)
        return self._dataset.index

    def _open(self) -> tuple[list[np.memmap], np.ndarray]:
        if self._maps is None:
            shards = self._index()["splits"][self.split]["shards"]
            root = self._dataset.path if self._dataset else Path(self.root)  # a URI's copy on this node
            self._maps = [map_for_random_reads(root / s["file"], self.dtype) for s in shards if s["tokens"]]
            self._starts = np.cumsum([0] + [len(m) for m in self._maps])
        assert self._starts is not None
        return self._maps, self._starts

    def span(self, start: int, stop: int, touched: list[tuple[int, int, int]] | None = None) -> np.ndarray:
        """Tokens ``[start, stop)`` of the split's stream (across shard boundaries); appends
        ``(shard, first, end)`` of each piece read to ``touched`` when given."""
        maps, starts = self._open()
        parts, pos = [], start
        k = int(np.searchsorted(starts, pos, side="right")) - 1
        while pos < stop:
            end = min(stop, int(starts[k + 1]))
            parts.append(maps[k][pos - starts[k] : end - starts[k]])
            if touched is not None:
                touched.append((k, int(pos - starts[k]), int(end - starts[k])))
            pos, k = end, k + 1
        return np.concatenate(parts) if len(parts) != 1 else np.asarray(parts[0])

    def take(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        bs, touched = self.block_size, []  # (shard, first, end) of every piece read
        rows = [self.span(int(i) * bs, (int(i) + 1) * bs, touched) for i in idx]
        out = np.stack(rows).astype(np.int64) if rows else np.empty((0, bs), dtype=np.int64)
        release(self._maps or [], touched)
        return {"input_ids": out}

    def fingerprint(self) -> str:
        fp = self._index()["fingerprint"]
        return hashlib.sha256(f"{fp}/{self.split}/{self.block_size}".encode()).hexdigest()


def all_blocks(source: BlockSource) -> dict[str, np.ndarray]:
    """Every example of a (small) source as arrays: for tests, benchmarks and inspection."""
    return source.take(np.arange(len(source)))
