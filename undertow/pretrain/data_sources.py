"""Turn the data config's source names into loader sources (preparing the embedded corpus on demand)."""

from undertow.pretrain.config import DataConfig

EMBEDDED = "embedded"


def resolve_sources(cfg: DataConfig) -> list[str]:
    """`embedded` becomes the cached shard directory of the corpus shipped in the package
    (tokenizer trained and shards written on first use); other sources pass through."""
    resolved = []
    for source in cfg.sources:
        if source == EMBEDDED:
            from undertow.data_prep.corpus import ensure_embedded_dataset

            source = ensure_embedded_dataset(vocab_size=cfg.embedded_vocab_size)
        resolved.append(source)
    return resolved
