"""Tokenize a stream of raw documents in worker processes, in input order, with bounded memory.

`tokenize_stream` is what the shard writer and the Megatron writer share:

    Sources.items()  --(main: batches of RawDocument/Skip)-->  N worker processes
        --(in order)-->  main: counts skips, yields TokenizedDoc(ordinal, source, index, tokens)

Workers only turn text into token arrays, so the output does not depend on how many there
are. Skips travel in the stream and are counted by the main process at their place in it;
when a `TokenizedDoc` with ordinal k is yielded, `skips` holds exactly the skips that came
before input document k, which is what makes resume and per-shard counts deterministic.
At most `2 * workers` batches are in flight, so a huge input never piles up in memory.
"""

from __future__ import annotations

import collections
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from undertow.data_prep.sources import EMPTY_AFTER_TOKENIZATION, RawDocument, Skip, SkipCounter, format_skips
from undertow.data_prep.tokenizer import Tokenizer

BATCH_DOCUMENTS = 64  # a batch closes at this many items ...
BATCH_CHARS = 1 << 20  # ... or this much text, whichever comes first


@dataclass(frozen=True)
class TokenizedDoc:
    """One tokenized input document."""

    ordinal: int  # position among all input documents (RawDocuments) of the stream, from 0
    source: str
    index: int
    tokens: np.ndarray  # (n,) ids in the stream's dtype, BOS/EOS included as requested


class _Encoder:
    """Text -> token array, with BOS/EOS; runs in a worker process (or inline)."""

    def __init__(self, tokenizer_path: str, dtype: str, add_bos: bool, append_eos: bool):
        tok = Tokenizer.load(tokenizer_path)
        self.encode = tok.encode
        self.dtype = np.dtype(dtype)
        self.prefix = [tok.bos_id] if add_bos else []
        self.suffix = [tok.eos_id] if append_eos else []

    def __call__(self, batch: list[RawDocument | Skip]) -> list[np.ndarray | Skip]:
        out: list[np.ndarray | Skip] = []
        for item in batch:
            if isinstance(item, Skip):
                out.append(item)
                continue
            ids = self.encode(item.text)
            if not ids:
                out.append(Skip(EMPTY_AFTER_TOKENIZATION, f"{item.source} document {item.index}"))
            else:
                out.append(np.asarray(self.prefix + ids + self.suffix, dtype=self.dtype))
        return out


_worker_encoder: _Encoder | None = None


def _init_worker(*args) -> None:
    global _worker_encoder
    _worker_encoder = _Encoder(*args)


def _encode_in_worker(batch: list[RawDocument | Skip]) -> list[np.ndarray | Skip]:
    assert _worker_encoder is not None, "worker initializer did not run"
    return _worker_encoder(batch)


def _after_prefix(items: Iterable[RawDocument | Skip], n_documents: int) -> Iterator[RawDocument | Skip]:
    """Drop the first `n_documents` documents and every skip before the last of them."""
    it = iter(items)
    seen = 0
    while seen < n_documents:
        item = next(it, None)
        if item is None:
            raise ValueError(f"the inputs hold fewer than {n_documents} documents, the number an earlier run "
                             "consumed: have they changed since?")
        seen += isinstance(item, RawDocument)
    yield from it


def _batches(items: Iterable[RawDocument | Skip]) -> Iterator[list[RawDocument | Skip]]:
    batch: list[RawDocument | Skip] = []
    chars = 0
    for item in items:
        batch.append(item)
        chars += len(item.text) if isinstance(item, RawDocument) else 0
        if len(batch) >= BATCH_DOCUMENTS or chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _encoded_batches(batches: Iterator[list], encoder_args: tuple, workers: int) -> Iterator[tuple[list, list]]:
    """(batch, encoded batch) pairs in input order, encoded inline or by a process pool."""
    if workers == 1:
        encoder = _Encoder(*encoder_args)
        for batch in batches:
            yield batch, encoder(batch)
        return
    # spawn, not fork: the parent may hold threads (tqdm, torch) that a fork would copy mid-lock.
    # An executor (unlike multiprocessing.Pool) fails when a worker dies instead of respawning forever.
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker, initargs=encoder_args)
    try:
        window: collections.deque = collections.deque()
        for batch in batches:
            window.append((batch, pool.submit(_encode_in_worker, batch)))
            if len(window) >= 2 * workers:
                batch, pending = window.popleft()
                yield batch, pending.result()
        while window:
            batch, pending = window.popleft()
            yield batch, pending.result()
    except BrokenProcessPool as e:
        raise RuntimeError("a tokenizer worker process died. Workers are spawned, so a script that prepares "
                           "data with workers > 1 must run it under `if __name__ == '__main__':`") from e
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def check_workers(workers: int) -> None:
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")


def tokenize_stream(
    items: Iterable[RawDocument | Skip],
    tokenizer_path: str,
    *,
    dtype: np.dtype,
    add_bos: bool,
    append_eos: bool,
    skips: SkipCounter,
    workers: int = 1,
    skip_documents: int = 0,
) -> Iterator[TokenizedDoc]:
    """Tokenize `items` in order; skips (bad input, empty after tokenization) go to `skips`.

    Args:
        items: a `Sources.items()` stream.
        tokenizer_path: SentencePiece model; each worker loads its own copy.
        dtype: numpy dtype of the token arrays (checked against the vocabulary by the caller).
        add_bos, append_eos: put BOS before / EOS after every document.
        skips: counter that receives every skip at its place in the stream.
        workers: 1 tokenizes in this process; N > 1 uses N spawned processes.
        skip_documents: resume point: this many input documents (and the skips among them)
            are dropped unread by the tokenizer; ordinals continue from it.
    """
    check_workers(workers)
    encoder_args = (tokenizer_path, np.dtype(dtype).str, add_bos, append_eos)
    ordinal = skip_documents
    batches = _batches(_after_prefix(items, skip_documents))
    for batch, encoded in _encoded_batches(batches, encoder_args, workers):
        for item, result in zip(batch, encoded):
            if isinstance(item, RawDocument):
                ordinal += 1
            if isinstance(result, Skip):
                skips.add(result)
            else:
                yield TokenizedDoc(ordinal - 1, item.source, item.index, result)


class Progress:
    """A tqdm bar over documents, with tokens and tokens/s (of this session) as its postfix."""

    def __init__(self, enabled: bool, desc: str, documents: int = 0, tokens: int = 0):
        from tqdm import tqdm

        self.bar = tqdm(desc=desc, unit=" docs", initial=documents, disable=not enabled, dynamic_ncols=True)
        self.tokens = tokens
        self.session_tokens = 0
        self.start = time.perf_counter()

    def update(self, tokens: int) -> None:
        """Count one written document of `tokens` tokens."""
        self.tokens += tokens
        self.session_tokens += tokens
        rate = self.session_tokens / max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix(tokens=f"{self.tokens:,}", tok_s=f"{rate:,.0f}", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def summary_line(documents: int, tokens: int, skipped: dict[str, int], shards: int | None = None) -> str:
    """The one-line result of a prep run."""
    shard_part = f", {shards} shards" if shards is not None else ""
    return (f"{documents:,} documents, {tokens:,} tokens{shard_part}; "
            f"skipped {sum(skipped.values()):,} ({format_skips(skipped)})")
