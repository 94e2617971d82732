"""Where the loader's documents come from: a source string resolved into an ordered list of shards.

A source string is one of:

- a directory holding `manifest.json` (an `undertow prep` output): its shards, in manifest order;
- a local path, glob or brace pattern of tar shards (`data/shard-{000000..000009}.tar`,
  `data/*.tar`); globs are expanded sorted, braces in the order written;
- a URL that `webdataset.gopen` opens, e.g. `pipe:COMMAND` (`pipe:cat data/shard-{0..3}.tar`: braces
  expand into one URL, so one command, per shard) or `https://...`;
- `megatron:PREFIX`, a Megatron `PREFIX.bin`/`PREFIX.idx` dataset read through megatron-core's
  `IndexedDataset`, cut into virtual shards of `MEGATRON_DOCS_PER_SHARD` consecutive documents.

Every shard set reads one shard at a time as `(key, tokens)` pairs in stored order: `key` is the
document's key (the Megatron document index as a string) and `tokens` a 1-D integer array that
already ends with EOS (prep appends it; the loader never adds tokens). Resolving checks everything
that can be checked without reading shards (files exist, manifest is valid, the Megatron index opens)
and raises ValueError naming the source.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import signal
import tarfile
from typing import Iterator, Protocol

import numpy as np
from braceexpand import braceexpand

from undertow.data_prep.format import MANIFEST_NAME, read_manifest, read_shard
from undertow.log import get_logger

log = get_logger("pretrain.loader")

MEGATRON_PREFIX = "megatron:"
MEGATRON_DOCS_PER_SHARD = 1024
# A pipe command closed before it finished writing dies of SIGPIPE: -13 when it is the shell's direct
# child, 141 when a shell reports it. Only tolerated when we stop reading a shard early on purpose.
_SIGPIPE_STATUSES = (-signal.SIGPIPE, 128 + signal.SIGPIPE)
_URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")


class ShardReadError(RuntimeError):
    """A shard could not be read (missing, truncated, failing pipe command...); names the shard."""


class ShardSet(Protocol):
    """An ordered list of shards of one source; picklable (DataLoader workers may receive a copy)."""

    source: str  # the source string as given
    name: str  # stable, relocation-proof namespace for hashing document keys (validation split)
    tokenizer: dict | None  # the manifest's tokenizer entry, if a manifest describes the shards

    def __len__(self) -> int: ...

    def documents(self, shard: int) -> Iterator[tuple[str, np.ndarray]]:
        """Yield (key, tokens (n,)) of shard `shard` in stored order; closing the iterator releases it."""
        ...

    def fingerprint(self) -> str:
        """A short digest of the shard list (names and order), to check a loader state belongs here."""
        ...


def _digest(parts: list[str]) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


class TarShards:
    """Webdataset tar shards opened with `webdataset.gopen` (local paths or URLs such as `pipe:`)."""

    def __init__(self, source: str, name: str, urls: list[str], tokenizer: dict | None,
                 sha256: list[str | None] | None = None):
        self.source, self.name, self.urls, self.tokenizer = source, name, urls, tokenizer
        # the manifest's digest per shard: each process checks a shard the first time it reads it whole
        self.sha256 = sha256 or [None] * len(urls)
        self._verified: set[int] = set()

    def __len__(self) -> int:
        return len(self.urls)

    def fingerprint(self) -> str:
        # Local files by basename and size, so a dataset copied elsewhere still matches a saved state.
        return _digest(
            [u if _URL_SCHEME.match(u) else f"{os.path.basename(u)}:{os.path.getsize(u)}" for u in self.urls]
        )

    def documents(self, shard: int) -> Iterator[tuple[str, np.ndarray]]:
        from webdataset import gopen

        url = self.urls[shard]
        finished = False
        try:
            stream = gopen(url, "rb")
        except OSError as e:
            raise ShardReadError(f"cannot open shard {url!r} of source {self.source!r}: {e}") from e
        expected = self.sha256[shard] if shard not in self._verified else None
        reader = _HashingReader(stream) if expected else stream
        try:
            for doc in read_shard(reader):
                yield doc.key, doc.tokens
            # Read the tar's trailing padding so a pipe's command can exit normally and its status counts.
            while reader.read(1 << 16):
                pass
            finished = True
        except (OSError, tarfile.TarError, ValueError) as e:
            raise ShardReadError(f"reading shard {url!r} of source {self.source!r}: {e}; if the file was damaged, "
                                 "re-run `undertow prep shards` with the same arguments (it rewrites damaged "
                                 "shards)") from e
        finally:
            _close(stream, url, finished)
        if expected:
            if reader.hexdigest() != expected:
                raise ShardReadError(f"shard {url!r} of source {self.source!r} is not the file `undertow prep shards` "
                                     f"wrote (sha256 {reader.hexdigest()[:16]}..., the manifest says "
                                     f"{expected[:16]}...): re-run `undertow prep shards` with the same arguments "
                                     "(it rewrites damaged shards)")
            self._verified.add(shard)


class _HashingReader:
    """A read-only file object that hashes the bytes read through it."""

    def __init__(self, stream):
        self.stream, self._hash = stream, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self._hash.update(data)
        return data

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def _close(stream, url: str, finished: bool) -> None:
    try:
        stream.close()
    except OSError as e:
        if finished or getattr(stream, "status", None) not in _SIGPIPE_STATUSES:
            raise ShardReadError(f"shard {url!r}: {e}") from e


def _megatron_tokenizer(prefix: str) -> dict | None:
    """The tokenizer entry of PREFIX.json, the record `undertow prep megatron` writes beside .bin/.idx."""
    record = f"{prefix}.json"
    if not os.path.isfile(record):
        return None
    with open(record) as f:
        return json.load(f).get("tokenizer")


class MegatronShards:
    """A Megatron `.bin/.idx` dataset, cut into virtual shards of `docs_per_shard` documents.

    A Megatron document may span several sequences (`document_indices`); its tokens are their
    concatenation. The dataset is opened lazily in each process that reads it.
    """

    def __init__(self, source: str, prefix: str, num_docs: int, docs_per_shard: int):
        self.source, self.prefix = source, prefix
        self.name = os.path.basename(prefix)
        self.tokenizer = _megatron_tokenizer(prefix)
        self.num_docs, self.docs_per_shard = num_docs, docs_per_shard
        self._dataset = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_dataset": None}  # memory maps are reopened, not pickled

    def __len__(self) -> int:
        return -(-self.num_docs // self.docs_per_shard)

    def fingerprint(self) -> str:
        return _digest([self.name, str(self.num_docs), str(self.docs_per_shard)])

    def documents(self, shard: int) -> Iterator[tuple[str, np.ndarray]]:
        if self._dataset is None:
            self._dataset = open_indexed_dataset(self.prefix)
        dataset = self._dataset
        bounds = dataset.document_indices
        first = shard * self.docs_per_shard
        for doc in range(first, min(first + self.docs_per_shard, self.num_docs)):
            sequences = dataset[int(bounds[doc]) : int(bounds[doc + 1])]
            tokens = sequences[0] if len(sequences) == 1 else np.concatenate(sequences or [np.zeros(0, np.int64)])
            yield str(doc), tokens


def open_indexed_dataset(prefix: str):
    """Open `prefix.bin/.idx` with megatron-core (imported here: it is optional and slow to import)."""
    try:
        from megatron.core.datasets.indexed_dataset import IndexedDataset
    except ImportError as e:
        raise ImportError(
            f"source {MEGATRON_PREFIX}{prefix} needs megatron-core, which is not importable ({e}); "
            "install it with `pip install 'undertow[megatron]'` or convert the data with `undertow prep`"
        ) from e
    return IndexedDataset(prefix)


def resolve_source(source: str, field: str) -> ShardSet:
    """Resolve one source string (see the module docstring); `field` names it in errors (`sources[1]`)."""
    if not isinstance(source, str) or not source.strip():
        raise ValueError(f"{field}={source!r}: a source must be a non-empty string")
    if source.startswith(MEGATRON_PREFIX):
        return _resolve_megatron(source, field)
    scheme = _URL_SCHEME.match(source)
    if scheme:
        return _resolve_urls(source, scheme.group(1), field)
    if os.path.isdir(source):
        return _resolve_directory(source, field)
    return _resolve_local_pattern(source, field)


def _resolve_megatron(source: str, field: str) -> MegatronShards:
    prefix = source[len(MEGATRON_PREFIX) :]
    missing = [p for p in (f"{prefix}.bin", f"{prefix}.idx") if not os.path.isfile(p)]
    if not prefix or missing:
        raise ValueError(f"{field}={source!r}: a Megatron source needs PREFIX.bin and PREFIX.idx; missing {missing}")
    num_docs = len(open_indexed_dataset(prefix).document_indices) - 1
    if num_docs <= 0:
        raise ValueError(f"{field}={source!r}: the Megatron dataset holds no documents")
    return MegatronShards(source, prefix, num_docs, MEGATRON_DOCS_PER_SHARD)


def _resolve_urls(source: str, scheme: str, field: str) -> TarShards:
    from webdataset.gopen import gopen_schemes

    known = sorted(k for k in gopen_schemes if not k.startswith("_"))
    if scheme not in known:
        raise ValueError(
            f"{field}={source!r}: unknown URL scheme {scheme!r}; valid: a directory, a local path/glob/brace "
            f"pattern, {MEGATRON_PREFIX}PREFIX, or a URL with scheme {known}"
        )
    urls = list(braceexpand(source))
    return TarShards(source, source, _no_duplicates(urls, source, field), tokenizer=None)


def _resolve_directory(directory: str, field: str) -> TarShards:
    if not os.path.isfile(os.path.join(directory, MANIFEST_NAME)):
        raise ValueError(
            f"{field}={directory!r}: the directory has no {MANIFEST_NAME}; give an `undertow prep` output "
            f"directory, or its shards as a pattern such as {os.path.join(directory, '*.tar')!r}"
        )
    try:
        manifest = read_manifest(directory)
        files = [entry["file"] for entry in manifest["shards"]]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{field}={directory!r}: invalid {MANIFEST_NAME}: {e!r}") from e
    if not files:
        raise ValueError(f"{field}={directory!r}: {MANIFEST_NAME} lists no shards")
    paths = [os.path.join(directory, f) for f in files]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise ValueError(
            f"{field}={directory!r}: {len(missing)} shard(s) listed in {MANIFEST_NAME} are missing: {missing[:5]}"
        )
    for entry, path in zip(manifest["shards"], paths):  # cheap: before any model is built
        size, listed = os.path.getsize(path), entry.get("bytes")
        if listed is not None and size != listed:
            raise ValueError(
                f"{field}={directory!r}: shard {path!r} has {size} bytes, {MANIFEST_NAME} says {listed}: it was "
                "truncated or changed after `undertow prep shards`; re-run that command with the same arguments "
                "(it rewrites damaged shards and keeps the rest)"
            )
    if not manifest.get("complete", False):
        log.warning(
            "%s=%r: manifest is not marked complete; reading the %d shards it lists", field, directory, len(paths)
        )
    name = os.path.basename(os.path.normpath(directory))
    return TarShards(directory, name, paths, manifest.get("tokenizer"), [e.get("sha256") for e in manifest["shards"]])


def _resolve_local_pattern(source: str, field: str) -> TarShards:
    paths: list[str] = []
    for pattern in braceexpand(source):
        if glob.has_magic(pattern):
            matched = sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
            if not matched:
                raise ValueError(f"{field}={source!r}: pattern {pattern!r} matches no file")
            paths.extend(matched)
        elif os.path.isfile(pattern):
            paths.append(pattern)
        else:
            raise ValueError(
                f"{field}={source!r}: no such file or directory {pattern!r}; valid: a directory with "
                f"{MANIFEST_NAME}, a path/glob/brace pattern of .tar shards, a pipe:/https: URL or {MEGATRON_PREFIX}PREFIX"
            )
    paths = _no_duplicates(paths, source, field)
    beside = os.path.join(os.path.dirname(paths[0]), MANIFEST_NAME)
    tokenizer = read_manifest(os.path.dirname(beside)).get("tokenizer") if os.path.isfile(beside) else None
    name = os.path.basename(os.path.normpath(source))
    return TarShards(source, name, paths, tokenizer)


def _no_duplicates(items: list[str], source: str, field: str) -> list[str]:
    seen: set[str] = set()
    repeated = [x for x in items if x in seen or seen.add(x)]
    if repeated:
        raise ValueError(
            f"{field}={source!r}: shards listed more than once (their documents would repeat): {repeated[:5]}"
        )
    return items


EMBEDDED = "embedded"  # the data.sources name of the corpus shipped in the package


def resolve_sources(cfg) -> list[str]:
    """The data config's (`DataConfig`) source names as loader sources: `embedded` becomes the
    cached shard directory of the corpus shipped in the package (tokenizer trained and shards
    written on first use); other sources pass through."""
    resolved = []
    for source in cfg.sources:
        if source == EMBEDDED:
            from undertow.data_prep.corpus import ensure_embedded_dataset

            source = ensure_embedded_dataset(vocab_size=cfg.embedded_vocab_size)
        resolved.append(source)
    return resolved
