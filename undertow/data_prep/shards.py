"""Prepare webdataset token shards (see `format.py`) from raw inputs, deterministically and resumably.

    manifest = prepare_shards(["data/*.jsonl.gz"], "tok.model", "shards/", shard_tokens=1 << 25, workers=8)

Documents are tokenized by `workers` processes and written by this one in input order;
a shard closes once it holds `shard_tokens` tokens at the end of an input document (documents
longer than `max_doc_tokens` are cut into pieces, which stay in one shard; `shard_tokens` is
lowered for a corpus too small to give `min_shards` shards), is
written to `NAME.tmp`, fsynced and renamed, and then the manifest is rewritten atomically.
The bytes of every shard and of the manifest depend only on the inputs and the settings
recorded in `manifest["settings"]`, never on the number of workers.

Resume: rerunning on a directory whose manifest is incomplete and has the same settings
drops the input documents the last finished shard consumed (`inputs_consumed`), restores
the skip counts it recorded, removes stray `.tmp` and unlisted shard files and goes on;
the result is byte-identical to an uninterrupted run. A complete manifest with the same
settings is returned as is; different settings are an error (use a new directory or
`overwrite=True`).

Manifest fields beyond the format contract: `tokenizer.unk_id`, `shards[i].bytes` and
`shards[i].sha256` (integrity of each shard file).
"""

from __future__ import annotations

import glob
import os
import shutil
from typing import Iterator, Sequence

from undertow.data_prep.format import (FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME, Document, read_manifest,
                                       sha256_file, write_json_atomic, write_shard)
from undertow.data_prep.pipeline import Progress, TokenizedDoc, check_workers, summary_line, tokenize_stream
from undertow.data_prep.sources import Sources, SkipCounter
from undertow.data_prep.tokenizer import Tokenizer, resolve_token_dtype
from undertow.log import get_logger

log = get_logger("undertow.data_prep.shards")

SHARD_NAME = "shard-{:06d}.tar"
SHARD_GLOB = "shard-*.tar"
TOKENIZER_NAME = "tokenizer.model"
DEFAULT_SHARD_TOKENS = 1 << 25  # ~64 MiB of uint16 ids per shard


def check_special_ids(tok: Tokenizer, add_bos: bool, append_eos: bool) -> None:
    """Fail before any work when BOS/EOS are asked for but the tokenizer has none."""
    if add_bos and tok.bos_id < 0:
        raise ValueError(f"add_bos is set but tokenizer {tok.path!r} has no BOS piece (bos_id -1)")
    if append_eos and tok.eos_id < 0:
        raise ValueError(f"append_eos is set but tokenizer {tok.path!r} has no EOS piece (eos_id -1)")


# Off by default: measured on a 4M-token corpus (docs/benchmarks.md), cutting it into 16 shards made
# one reader see 2 of them in a 250-step run (each reader reads its shards one after another, shuffled
# within a shard) and the validation loss rose and fell; one shard, shuffled whole, fell at every
# evaluation. Readers that share a shard split it at document level, so fewer shards than readers is
# correct; --min-shards N is for many readers of a mid-sized corpus, where reading whole files pays.
DEFAULT_MIN_SHARDS = 1
BYTES_PER_TOKEN_ESTIMATE = 3  # text: ~4 bytes a token; compressed inputs hold more tokens per byte


def _settings(sources: Sources, tok: Tokenizer, dtype: str, shard_tokens: int, append_eos: bool,
              add_bos: bool, max_doc_tokens: int, min_shards: int) -> dict:
    """Everything that determines the bytes of the shards (workers and progress do not). The newer
    options appear only when they change the bytes, so directories of older versions still resume."""
    settings = {"inputs": sources.describe(), "field": sources.field, "text_split": sources.text_split,
                "tokenizer_sha256": tok.sha256, "dtype": dtype, "shard_tokens": shard_tokens,
                "append_eos": append_eos, "add_bos": add_bos}
    if max_doc_tokens:
        settings["max_doc_tokens"] = max_doc_tokens
    if shard_size_for(sources, shard_tokens, min_shards)[1]:
        settings["min_shards"] = min_shards
    return settings


def shard_size_for(sources: Sources, shard_tokens: int, min_shards: int) -> tuple[int, str | None]:
    """The tokens per shard to use: `shard_tokens`, lowered for a corpus too small to give `min_shards`
    shards of it, so every rank and loader worker can read shards of its own (the loader shares
    shards at document level otherwise: correct, but slower and less shuffled). The size is
    estimated from the input files' sizes (deterministic: the same inputs give the same shards).
    Returns (tokens per shard, why it was lowered or None)."""
    estimate = sum(entry["bytes"] for entry in sources.describe()) // BYTES_PER_TOKEN_ESTIMATE
    if min_shards <= 1 or estimate >= min_shards * shard_tokens:
        return shard_tokens, None
    lowered = max(1, estimate // min_shards)
    return lowered, (f"shard_tokens lowered from {shard_tokens:,} to {lowered:,}: the inputs hold ~{estimate:,} "
                     f"tokens (estimated from their size), and min_shards = {min_shards} asks for that many shards "
                     "so ranks and loader workers each read their own")


def split_long_documents(stream: Iterator[TokenizedDoc], max_tokens: int) -> Iterator[tuple[TokenizedDoc, bool]]:
    """(document or piece, whether it ends its input document): documents longer than `max_tokens`
    cut into consecutive pieces of at most `max_tokens` (0: never cut)."""
    for doc in stream:
        n = int(doc.tokens.shape[0])
        if not max_tokens or n <= max_tokens:
            yield doc, True
            continue
        for start in range(0, n, max_tokens):
            piece = TokenizedDoc(doc.ordinal, doc.source, doc.index, doc.tokens[start:start + max_tokens])
            yield piece, start + max_tokens >= n


def _own_files(out_dir: str) -> list[str]:
    """Files in `out_dir` that a prep run writes (and may delete): shards, manifest, temp files."""
    names = glob.glob(os.path.join(glob.escape(out_dir), SHARD_GLOB)) + glob.glob(os.path.join(glob.escape(out_dir), "*.tmp"))
    manifest = os.path.join(out_dir, MANIFEST_NAME)
    return sorted(names + ([manifest] if os.path.exists(manifest) else []))


def _existing_manifest(out_dir: str, settings: dict, overwrite: bool) -> dict | None:
    """The manifest to continue from, None for a fresh start; errors on a conflicting directory."""
    if overwrite:
        for path in _own_files(out_dir):
            os.remove(path)
        return None
    if not os.path.exists(os.path.join(out_dir, MANIFEST_NAME)):
        if glob.glob(os.path.join(glob.escape(out_dir), SHARD_GLOB)):
            raise ValueError(f"{out_dir!r} holds shard files but no {MANIFEST_NAME}; use a new output directory "
                             "or overwrite=True (--overwrite) to replace them")
        return None
    manifest = read_manifest(out_dir)
    old = manifest.get("settings", {})
    if old != settings:
        changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        detail = "; ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in changed)
        raise ValueError(f"{out_dir!r} was prepared with different settings ({detail}); use a new output directory "
                         "or overwrite=True (--overwrite) to replace it")
    return manifest


def _first_damaged(out_dir: str, manifest: dict) -> int | None:
    """The index of the first listed shard that is missing or not the file written (size, sha256)."""
    for i, shard in enumerate(manifest["shards"]):
        path = os.path.join(out_dir, shard["file"])
        if (not os.path.exists(path) or os.path.getsize(path) != shard["bytes"]
                or ("sha256" in shard and sha256_file(path) != shard["sha256"])):
            return i
    return None


def _repair(out_dir: str, manifest: dict) -> bool:
    """Cut the manifest before its first damaged shard (missing, truncated or altered), so the run
    writes it and everything after again from the inputs; True if it cut. The shards before stay."""
    damaged = _first_damaged(out_dir, manifest)
    if damaged is None:
        return False
    kept = manifest["shards"][:damaged]
    log.warning("%s: shard %s is missing or not the file written (size or sha256 differ): rewriting it and the "
                "%d shard(s) after it from the inputs", out_dir, manifest["shards"][damaged]["file"],
                len(manifest["shards"]) - damaged - 1)
    manifest["shards"] = kept
    manifest["documents"] = sum(s["documents"] for s in kept)
    manifest["tokens"] = sum(s["tokens"] for s in kept)
    manifest["skipped"] = dict(kept[-1].get("skipped_so_far", {})) if kept else {}
    manifest["complete"] = False
    write_json_atomic(os.path.join(out_dir, MANIFEST_NAME), manifest)
    return True


def _clean_for_resume(out_dir: str, manifest: dict) -> None:
    """Remove temp files and shards the manifest does not list (after `_repair`, the damaged ones)."""
    listed = {s["file"] for s in manifest["shards"]}
    for path in _own_files(out_dir):
        name = os.path.basename(path)
        if name.endswith(".tmp") or (name != MANIFEST_NAME and name not in listed):
            os.remove(path)


def _remove_empty_output(out_dir: str, created: bool, had_tokenizer: bool) -> None:
    """Remove what a run that wrote no document left: its manifest, its tokenizer copy (not one that
    was there before), and `out_dir` itself when this run created it and nothing else is in it."""
    for path in _own_files(out_dir):
        os.remove(path)
    tokenizer = os.path.join(out_dir, TOKENIZER_NAME)
    if not had_tokenizer and os.path.exists(tokenizer):
        os.remove(tokenizer)
    if created and not os.listdir(out_dir):
        os.rmdir(out_dir)


def _tokenizer_file(tokenizer_path: str, out_dir: str, tok: Tokenizer, copy: bool, overwrite: bool) -> str:
    """Install the tokenizer beside the shards if asked; return the manifest's tokenizer.file.

    The name is relative to `out_dir` when the model lies inside it, absolute otherwise.
    """
    if copy:
        dest = os.path.join(out_dir, TOKENIZER_NAME)
        if os.path.exists(dest) and sha256_file(dest) != tok.sha256 and not overwrite:
            raise ValueError(f"{dest!r} exists and is a different tokenizer; use a new output directory "
                             "or overwrite=True (--overwrite)")
        if not os.path.exists(dest) or sha256_file(dest) != tok.sha256:
            shutil.copyfile(tokenizer_path, f"{dest}.tmp")
            os.replace(f"{dest}.tmp", dest)
        return TOKENIZER_NAME
    model, root = os.path.abspath(tokenizer_path), os.path.abspath(out_dir)
    return os.path.relpath(model, root) if os.path.commonpath([model, root]) == root else model


def _shard_documents(first: tuple[TokenizedDoc, bool], stream: Iterator[tuple[TokenizedDoc, bool]], key_start: int,
                     shard_tokens: int, last: list, bar: Progress) -> Iterator[Document]:
    """Documents (or pieces) of one shard: `first`, then more from `stream` until `shard_tokens` is
    reached at the end of an input document (its pieces stay in one shard, so a resume that skips
    the input documents a shard consumed never cuts one).

    The stream is not advanced past the shard's last document, so the skip counts seen when
    the shard closes are exactly those before its end. `last` receives the last document.
    """
    item: tuple[TokenizedDoc, bool] | None = first
    tokens = 0
    while item is not None:
        doc, ends = item
        n = int(doc.tokens.shape[0])
        yield Document(f"{key_start:012d}", doc.tokens, {"source": doc.source, "index": doc.index, "tokens": n})
        last[:] = [doc]
        bar.update(n)
        key_start += 1
        tokens += n
        if tokens >= shard_tokens and ends:
            return
        item = next(stream, None)


def _write_shards(stream: Iterator[tuple[TokenizedDoc, bool]], out_dir: str, manifest: dict, skips: SkipCounter,
                  shard_tokens: int, bar: Progress) -> None:
    while (first := next(stream, None)) is not None:
        name = SHARD_NAME.format(len(manifest["shards"]))
        path = os.path.join(out_dir, name)
        last: list[TokenizedDoc] = []
        with open(f"{path}.tmp", "wb") as f:
            n_docs, n_tokens = write_shard(f, _shard_documents(first, stream, manifest["documents"], shard_tokens,
                                                                last, bar))
            f.flush()
            os.fsync(f.fileno())
        os.replace(f"{path}.tmp", path)
        manifest["shards"].append({"file": name, "documents": n_docs, "tokens": n_tokens,
                                   "inputs_consumed": last[0].ordinal + 1,
                                   "bytes": os.path.getsize(path), "sha256": sha256_file(path),
                                   "skipped_so_far": skips.as_dict()})
        manifest["documents"] += n_docs
        manifest["tokens"] += n_tokens
        manifest["skipped"] = skips.as_dict()
        write_json_atomic(os.path.join(out_dir, MANIFEST_NAME), manifest)


def prepare_shards(
    inputs: Sequence[str],
    tokenizer_path: str,
    out_dir: str,
    *,
    shard_tokens: int | None = None,
    workers: int = 1,
    dtype: str = "auto",
    append_eos: bool = True,
    add_bos: bool = False,
    fmt: str = "auto",
    field: str = "text",
    text_split: str = "file",
    overwrite: bool = False,
    copy_tokenizer: bool = True,
    progress: bool = True,
    max_doc_tokens: int = 0,
    min_shards: int = DEFAULT_MIN_SHARDS,
) -> dict:
    """Tokenize `inputs` into webdataset shards plus `manifest.json` in `out_dir`; return the manifest.

    Args:
        inputs: file paths / glob patterns (see `Sources`); fmt, field, text_split: how to read them.
        tokenizer_path: SentencePiece model file.
        out_dir: created if missing; resumed if it holds an incomplete run with the same settings.
        shard_tokens: a shard closes at the first document that brings it to this many tokens (None:
            DEFAULT_SHARD_TOKENS, lowered for a small corpus to give `min_shards` shards).
        workers: tokenizer processes (not part of the settings: any count gives the same bytes).
        dtype: "auto" (smallest that fits the vocabulary), "uint16" or "uint32".
        append_eos, add_bos: put EOS after / BOS before every document.
        overwrite: delete shards and manifest already in `out_dir` (other files are kept).
        copy_tokenizer: copy the model into `out_dir` as tokenizer.model, making it self-contained.
        progress: show a tqdm bar.
        max_doc_tokens: cut documents longer than this into pieces of at most this many tokens, each
            stored as a document (0: never cut).
        min_shards: with the default shard_tokens, lower it for a small corpus so it still gives about
            this many shards (`shard_size_for`; 1: never lower it). An explicit shard_tokens is kept.
    """
    if shard_tokens is None:
        shard_tokens = DEFAULT_SHARD_TOKENS
    else:
        min_shards = 1  # the size asked for
    if not isinstance(shard_tokens, int) or shard_tokens <= 0:
        raise ValueError(f"shard_tokens must be a positive integer, got {shard_tokens!r}")
    if not isinstance(max_doc_tokens, int) or max_doc_tokens < 0:
        raise ValueError(f"max_doc_tokens must be an integer >= 0 (0: never cut), got {max_doc_tokens!r}")
    if not isinstance(min_shards, int) or min_shards < 1:
        raise ValueError(f"min_shards must be an integer >= 1, got {min_shards!r}")
    check_workers(workers)
    sources = Sources(inputs, fmt=fmt, field=field, text_split=text_split)
    tok = Tokenizer.load(tokenizer_path)
    np_dtype = resolve_token_dtype(tok.vocab_size, dtype)
    check_special_ids(tok, add_bos, append_eos)
    settings = _settings(sources, tok, np_dtype.name, shard_tokens, append_eos, add_bos, max_doc_tokens, min_shards)
    shard_tokens, lowered = shard_size_for(sources, shard_tokens, min_shards)

    created = not os.path.exists(out_dir)
    had_tokenizer = os.path.exists(os.path.join(out_dir, TOKENIZER_NAME))
    os.makedirs(out_dir, exist_ok=True)
    manifest = _existing_manifest(out_dir, settings, overwrite)
    if manifest is not None:
        _repair(out_dir, manifest)
    if manifest is not None and manifest["complete"]:
        log.info("%s is already complete: %s", out_dir, summary_line(
            manifest["documents"], manifest["tokens"], manifest["skipped"], len(manifest["shards"])))
        return manifest
    if manifest is not None:
        _clean_for_resume(out_dir, manifest)
        log.info("resuming %s after %d shards (%d input documents consumed)", out_dir, len(manifest["shards"]),
                 manifest["shards"][-1]["inputs_consumed"] if manifest["shards"] else 0)
    else:
        manifest = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "dtype": np_dtype.name,
                    "tokenizer": tok.describe(_tokenizer_file(tokenizer_path, out_dir, tok, copy_tokenizer, overwrite)),
                    "settings": settings, "shards": [], "documents": 0, "tokens": 0, "skipped": {},
                    "complete": False}
        write_json_atomic(os.path.join(out_dir, MANIFEST_NAME), manifest)

    skips = SkipCounter(counts=manifest["skipped"])
    consumed = manifest["shards"][-1]["inputs_consumed"] if manifest["shards"] else 0
    stream = tokenize_stream(sources.items(), tokenizer_path, dtype=np_dtype, add_bos=add_bos,
                             append_eos=append_eos, skips=skips, workers=workers, skip_documents=consumed)
    bar = Progress(progress, "prep shards", manifest["documents"], manifest["tokens"])
    if lowered:
        log.info("%s", lowered)
    try:
        _write_shards(split_long_documents(stream, max_doc_tokens), out_dir, manifest, skips, shard_tokens, bar)
    finally:
        bar.close()
        stream.close()
    if manifest["documents"] == 0:  # leave nothing behind that looks like a dataset
        _remove_empty_output(out_dir, created, had_tokenizer)
        if skips.as_dict():
            raise ValueError(f"no documents to write: every input document was skipped ({skips.summary()})")
        raise ValueError(f"no documents to write: the inputs {list(inputs)!r} hold no text "
                         f"(format {fmt!r}, field {field!r}); nothing was written")
    manifest["skipped"] = skips.as_dict()
    manifest["complete"] = True
    write_json_atomic(os.path.join(out_dir, MANIFEST_NAME), manifest)
    log.info("prepared %s: %s; %d shards of <= ~%s tokens%s", out_dir,
             summary_line(manifest["documents"], manifest["tokens"], manifest["skipped"], len(manifest["shards"])),
             len(manifest["shards"]), f"{shard_tokens:,}",
             f" (shard_tokens lowered for min_shards = {min_shards})" if lowered else "")
    return manifest
