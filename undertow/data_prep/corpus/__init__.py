"""The embedded default corpus and the ready-to-train dataset built from it.

`EMBEDDED_CORPUS` is a small JSONL.gz of Python reference-manual text shipped in the
package (see README.md here). `ensure_embedded_dataset()` turns it into a shard directory
(BPE tokenizer + webdataset shards + manifest) once per settings and returns its path;
later calls find it in the cache and return at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile

from undertow.data_prep.format import MANIFEST_NAME, read_manifest, sha256_file
from undertow.cache import cache_root
from undertow.log import get_logger

log = get_logger("undertow.data_prep.corpus")

EMBEDDED_CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pydoc_topics.jsonl.gz")
RECIPE_VERSION = 1  # bump when the way the dataset is built changes, so old caches are not reused


def default_cache_dir() -> str:
    """The package's cache (undertow/cache.py: $UNDERTOW_CACHE, else $XDG_CACHE_HOME/undertow or ~/.cache/undertow)."""
    return cache_root()


def _is_complete(directory: str) -> bool:
    if not os.path.exists(os.path.join(directory, MANIFEST_NAME)):
        return False
    return bool(read_manifest(directory).get("complete"))


def _build(directory: str, vocab_size: int, shard_tokens: int, workers: int) -> None:
    from undertow.data_prep.shards import TOKENIZER_NAME, prepare_shards
    from undertow.data_prep.sources import Sources, SkipCounter
    from undertow.data_prep.tokenizer import train_tokenizer

    tokenizer_path = os.path.join(directory, TOKENIZER_NAME)
    texts = (doc.text for doc in Sources([EMBEDDED_CORPUS]).documents(SkipCounter()))
    train_tokenizer(texts, tokenizer_path, vocab_size=vocab_size, model_type="bpe", byte_fallback=True)
    prepare_shards([EMBEDDED_CORPUS], tokenizer_path, directory, shard_tokens=shard_tokens, workers=workers,
                   progress=False, min_shards=1)  # its shard size is chosen (shard_tokens), and keyed in the cache


def ensure_embedded_dataset(cache_dir: str | None = None, vocab_size: int = 2048, shard_tokens: int = 65536,
                            workers: int = 1) -> str:
    """Return a shard directory (manifest.json, shard-*.tar, tokenizer.model) of the embedded corpus.

    The directory is `<cache_dir>/embedded/pydoc-<hash>`, the hash covering the corpus file
    and the settings (not `workers`, which does not change the bytes). It is built in a
    temporary sibling and renamed into place, so a crash never leaves a directory that looks
    done; concurrent callers each build and the first rename wins.
    """
    if not isinstance(vocab_size, int) or vocab_size <= 0:
        raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    if not isinstance(shard_tokens, int) or shard_tokens <= 0:
        raise ValueError(f"shard_tokens must be a positive integer, got {shard_tokens!r}")
    key_fields = {"corpus_sha256": sha256_file(EMBEDDED_CORPUS), "vocab_size": vocab_size,
                  "shard_tokens": shard_tokens, "recipe": RECIPE_VERSION}
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:16]
    parent = os.path.join(cache_dir or default_cache_dir(), "embedded")
    final = os.path.join(parent, f"pydoc-{key}")
    if _is_complete(final):
        return final

    os.makedirs(parent, exist_ok=True)
    log.info("building the embedded dataset (vocab %d) in %s", vocab_size, final)
    building = tempfile.mkdtemp(prefix=".building-", dir=parent)
    try:
        _build(building, vocab_size, shard_tokens, workers)
        if os.path.exists(final) and not _is_complete(final):
            shutil.rmtree(final)  # damaged from outside (the rename below is all-or-nothing)
        try:
            os.rename(building, final)
        except OSError:
            if not _is_complete(final):
                raise
            log.info("another process built %s first; using it", final)
    finally:
        if os.path.exists(building):
            shutil.rmtree(building)
    return final
