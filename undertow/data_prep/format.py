"""The on-disk format of prepared token data: webdataset .tar shards plus a manifest.

A shard is a POSIX tar file readable by `webdataset`. Each document is one sample of
two members sharing a key (the key holds no dots, as webdataset groups by the text
before the first dot):

    <key>.tokens.npy   1-D numpy array of token ids (dtype uint16 or uint32, see manifest)
    <key>.json         metadata: {"source": str, "index": int, "tokens": int}

Members are written with fixed metadata (mtime 0, uid/gid 0, no user names, mode 0644)
so that the same documents give byte-identical shards.

The manifest (`manifest.json` beside the shards) describes the whole set:

    {"format": "undertow-shards", "version": 1,
     "dtype": "uint16",
     "tokenizer": {"file": str, "sha256": str, "vocab_size": int,
                   "bos_id": int, "eos_id": int, "pad_id": int},
     "settings": {...},                       # everything that determines the bytes
     "shards": [{"file": "shard-000000.tar", "documents": int, "tokens": int,
                 "inputs_consumed": int,      # input documents read up to this shard's end
                 "bytes": int, "sha256": str, # the file as written (the loader checks both)
                 "skipped_so_far": {...}}],   # skip counts up to this shard's end
     "documents": int, "tokens": int,
     "skipped": {"reason": count, ...},
     "complete": bool}
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from typing import IO, Iterable, Iterator

import numpy as np

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "undertow-shards"
FORMAT_VERSION = 1
TOKENS_SUFFIX = "tokens.npy"
META_SUFFIX = "json"


@dataclass
class Document:
    """One tokenized document as stored in a shard."""

    key: str
    tokens: np.ndarray  # (n,) uint16/uint32
    meta: dict


def token_dtype_for_vocab(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id of a vocabulary of this size."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    if vocab_size <= np.iinfo(np.uint16).max + 1:
        return np.dtype(np.uint16)
    if vocab_size <= np.iinfo(np.uint32).max + 1:
        return np.dtype(np.uint32)
    raise ValueError(f"vocab_size {vocab_size} does not fit in uint32")


def _add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name=name)
    info.size = len(payload)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(payload))


def encode_tokens(tokens: np.ndarray) -> bytes:
    """Serialize a 1-D token array as .npy bytes (deterministic)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(tokens), allow_pickle=False)
    return buf.getvalue()


def decode_tokens(payload: bytes) -> np.ndarray:
    """Inverse of `encode_tokens`; never unpickles."""
    arr = np.load(io.BytesIO(payload), allow_pickle=False)
    if arr.ndim != 1:
        raise ValueError(f"token array must be 1-D, got shape {arr.shape}")
    return arr


def write_shard(fileobj: IO[bytes], docs: Iterable[Document]) -> tuple[int, int]:
    """Write documents as one tar shard to an open binary file. Returns (documents, tokens)."""
    n_docs = n_tokens = 0
    with tarfile.open(fileobj=fileobj, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for doc in docs:
            if "." in doc.key or "/" in doc.key:
                raise ValueError(f"document key {doc.key!r} must not contain '.' or '/'")
            _add_member(tar, f"{doc.key}.{TOKENS_SUFFIX}", encode_tokens(doc.tokens))
            meta = json.dumps(doc.meta, sort_keys=True, separators=(",", ":")).encode()
            _add_member(tar, f"{doc.key}.{META_SUFFIX}", meta)
            n_docs += 1
            n_tokens += int(doc.tokens.shape[0])
    return n_docs, n_tokens


def read_shard(fileobj: IO[bytes]) -> Iterator[Document]:
    """Iterate the documents of one shard from an open binary stream (file, pipe, socket)."""
    pending: dict[str, dict] = {}
    with tarfile.open(fileobj=fileobj, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            base = os.path.basename(member.name)
            key, _, suffix = base.partition(".")
            f = tar.extractfile(member)
            payload = f.read() if f is not None else b""
            entry = pending.setdefault(key, {})
            entry[suffix] = payload
            if TOKENS_SUFFIX in entry and META_SUFFIX in entry:
                del pending[key]
                yield Document(key, decode_tokens(entry[TOKENS_SUFFIX]), json.loads(entry[META_SUFFIX]))
    if pending:
        raise ValueError(f"shard ends with incomplete samples: {sorted(pending)[:5]}")


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: str, obj: dict) -> None:
    """Write JSON next to `path` and rename over it, so readers never see half a file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(directory: str) -> dict:
    """Load and check the manifest of a shard directory."""
    path = os.path.join(directory, MANIFEST_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {MANIFEST_NAME} in {directory!r}: is it an `undertow prep shards` output?")
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT_NAME or manifest.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: format {manifest.get('format')!r} v{manifest.get('version')!r}, "
            f"expected {FORMAT_NAME!r} v{FORMAT_VERSION}"
        )
    return manifest
