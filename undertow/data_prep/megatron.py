"""Megatron-LM `.bin/.idx` datasets, written and read through megatron-core's indexed_dataset.

    write_megatron(["data/*.jsonl"], "tok.model", "out/corpus")   # -> out/corpus.bin, .idx, .json
    megatron_from_shards("shards/", "out/corpus")                  # same tokens as the shards
    ds = open_megatron("out/corpus"); ds[0]                        # (n,) ids of document 0

One sequence per document (Megatron's `add_item` + `end_document`), BOS/EOS added exactly
as `prepare_shards` adds them, id dtype as Megatron's own preprocessing picks it
(`DType.optimal_dtype(vocab_size)`: uint16 below 65500, else int32). The .bin and .idx are
written under temp names and renamed when complete. `<prefix>.json` records what Megatron's
files cannot: the tokenizer, the counts and the skipped inputs.

megatron-core is imported only here and only when called: `pip install 'undertow[megatron]'`.
"""

from __future__ import annotations

import os
import warnings
from typing import Iterator, Sequence

import numpy as np

from undertow.data_prep.format import read_manifest, read_shard, write_json_atomic
from undertow.data_prep.pipeline import Progress, check_workers, summary_line, tokenize_stream
from undertow.data_prep.shards import check_special_ids
from undertow.data_prep.sources import Sources, SkipCounter
from undertow.data_prep.tokenizer import Tokenizer, resolve_token_dtype
from undertow.log import get_logger

log = get_logger("undertow.data_prep.megatron")


def _indexed_dataset():
    """megatron.core.datasets.indexed_dataset, or a clear error naming the extra to install."""
    try:
        with warnings.catch_warnings():  # megatron-core warns about optional GPU libraries on import
            warnings.simplefilter("ignore")
            from megatron.core.datasets import indexed_dataset
    except ImportError as e:
        raise ImportError(f"Megatron .bin/.idx support needs megatron-core ({e}): pip install 'undertow[megatron]'") from e
    return indexed_dataset


def _build(out_prefix: str, vocab_size: int, sequences: Iterator[np.ndarray], bar: Progress) -> tuple[int, int, str]:
    """Write `sequences` (one per document) as `<out_prefix>.bin/.idx`; return (documents, tokens, dtype)."""
    import torch

    idx_mod = _indexed_dataset()
    dtype = idx_mod.DType.optimal_dtype(vocab_size)
    bin_path, idx_path = idx_mod.get_bin_path(out_prefix), idx_mod.get_idx_path(out_prefix)
    os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
    builder = idx_mod.IndexedDatasetBuilder(f"{bin_path}.tmp", dtype=dtype)
    n_docs = n_tokens = 0
    for tokens in sequences:
        builder.add_item(torch.from_numpy(tokens.astype(dtype)))
        builder.end_document()
        n_docs += 1
        n_tokens += int(tokens.shape[0])
        bar.update(int(tokens.shape[0]))
    builder.finalize(f"{idx_path}.tmp")
    os.replace(f"{bin_path}.tmp", bin_path)
    os.replace(f"{idx_path}.tmp", idx_path)  # the .idx last: its presence means the pair is complete
    return n_docs, n_tokens, np.dtype(dtype).name


def _finish(out_prefix: str, record: dict) -> dict:
    write_json_atomic(f"{out_prefix}.json", record)
    log.info("wrote %s.bin/.idx: %s", out_prefix, summary_line(record["documents"], record["tokens"], record["skipped"]))
    return record


def write_megatron(
    inputs: Sequence[str],
    tokenizer_path: str,
    out_prefix: str,
    *,
    workers: int = 1,
    append_eos: bool = True,
    add_bos: bool = False,
    fmt: str = "auto",
    field: str = "text",
    text_split: str = "file",
    progress: bool = True,
) -> dict:
    """Tokenize `inputs` into `<out_prefix>.bin/.idx` (+ `.json`); return the .json record.

    Arguments mean what they mean for `prepare_shards`; the documents and tokens are the same.
    """
    check_workers(workers)
    _indexed_dataset()  # fail on a missing megatron-core before any work
    sources = Sources(inputs, fmt=fmt, field=field, text_split=text_split)
    tok = Tokenizer.load(tokenizer_path)
    check_special_ids(tok, add_bos, append_eos)
    skips = SkipCounter()
    stream = tokenize_stream(sources.items(), tokenizer_path, dtype=resolve_token_dtype(tok.vocab_size),
                             add_bos=add_bos, append_eos=append_eos, skips=skips, workers=workers)
    bar = Progress(progress, "prep megatron")
    try:
        n_docs, n_tokens, dtype = _build(out_prefix, tok.vocab_size, (d.tokens for d in stream), bar)
    finally:
        bar.close()
        stream.close()
    return _finish(out_prefix, {
        "documents": n_docs, "tokens": n_tokens, "dtype": dtype, "skipped": skips.as_dict(),
        "tokenizer": tok.describe(os.path.abspath(tokenizer_path)),
        "settings": {"inputs": sources.describe(), "field": field, "text_split": text_split,
                     "append_eos": append_eos, "add_bos": add_bos}})


def _shard_sequences(shard_dir: str, manifest: dict) -> Iterator[np.ndarray]:
    for shard in manifest["shards"]:
        path = os.path.join(shard_dir, shard["file"])
        n = 0
        with open(path, "rb") as f:
            for doc in read_shard(f):
                n += 1
                yield doc.tokens
        if n != shard["documents"]:
            raise ValueError(f"{path!r} holds {n} documents but the manifest says {shard['documents']}")


def megatron_from_shards(shard_dir: str, out_prefix: str, *, progress: bool = True) -> dict:
    """Convert a complete `prepare_shards` directory into `<out_prefix>.bin/.idx` (+ `.json`)."""
    _indexed_dataset()  # fail on a missing megatron-core before any work
    manifest = read_manifest(shard_dir)
    if not manifest["complete"]:
        raise ValueError(f"{shard_dir!r} is an unfinished prep (manifest complete=false); "
                         "finish it with `undertow prep shards` first")
    bar = Progress(progress, "prep megatron")
    try:
        n_docs, n_tokens, dtype = _build(out_prefix, manifest["tokenizer"]["vocab_size"],
                                         _shard_sequences(shard_dir, manifest), bar)
    finally:
        bar.close()
    tokenizer = dict(manifest["tokenizer"])
    if not os.path.isabs(tokenizer["file"]):
        tokenizer["file"] = os.path.abspath(os.path.join(shard_dir, tokenizer["file"]))
    return _finish(out_prefix, {"documents": n_docs, "tokens": n_tokens, "dtype": dtype,
                                "skipped": manifest["skipped"], "tokenizer": tokenizer,
                                "settings": {**manifest["settings"], "from_shards": os.path.abspath(shard_dir)}})


def open_megatron(prefix: str):
    """megatron-core's `IndexedDataset` over `<prefix>.bin/.idx`; `ds[i]` is document i's ids."""
    idx_mod = _indexed_dataset()
    if not idx_mod.IndexedDataset.exists(prefix):
        raise FileNotFoundError(f"no Megatron dataset at {prefix!r} (expected {prefix}.bin and {prefix}.idx)")
    return idx_mod.IndexedDataset(prefix)
