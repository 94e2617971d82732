"""Corpus statistics read back from prepared shards."""

import math
import os

import numpy as np

from undertow.data_prep.format import read_manifest, read_shard


def token_counts(shard_dir: str) -> np.ndarray:
    """Occurrences of every token id over all shards of a prepared directory: (vocab_size,) int64."""
    manifest = read_manifest(shard_dir)
    counts = np.zeros(manifest["tokenizer"]["vocab_size"], dtype=np.int64)
    for shard in manifest["shards"]:
        with open(os.path.join(shard_dir, shard["file"]), "rb") as f:
            for doc in read_shard(f):
                counts += np.bincount(doc.tokens, minlength=counts.shape[0])[: counts.shape[0]]
    return counts


def unigram_entropy(shard_dir: str) -> float:
    """Entropy in nats of the corpus's token distribution: the loss of the best context-free model.

    A language model that learns anything beyond token frequencies goes below it.
    """
    counts = token_counts(shard_dir).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum()) if p.size else math.nan
