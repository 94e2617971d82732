"""Tiny deterministic corpora and a tokenizer trained on them, shared by the data_prep tests."""

import json
import logging
import random

import pytest

from undertow.data_prep.tokenizer import train_tokenizer

WORDS = ("the state of a recurrent model carries what it has read so far while each new token "
         "updates it through a gate that decides how much to keep and how much to forget; "
         "scans run in chunks, 42 times, over 1024 steps!").split()


def make_texts(n: int, seed: int = 0) -> list[str]:
    """`n` short documents of a few lines each, the same for the same seed."""
    rng = random.Random(seed)
    return ["\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
                      for _ in range(rng.randint(1, 4)))
            for _ in range(n)]


def write_jsonl(path, records) -> str:
    """Write records (dicts, or raw str lines written as given) as JSONL; return the path as str."""
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            f.write((rec if isinstance(rec, str) else json.dumps(rec)) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> str:
    """120 documents in one JSONL file."""
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    return write_jsonl(path, [{"text": t} for t in make_texts(120)])


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory) -> str:
    """A BPE model, vocab 400, byte fallback, unk/bos/eos/pad = 0/1/2/3."""
    path = str(tmp_path_factory.mktemp("tok") / "bpe.model")
    train_tokenizer(make_texts(300, seed=1), path, vocab_size=400)
    return path


@pytest.fixture
def undertow_logs(caplog):
    """caplog that also sees the `undertow` logger (which does not propagate to the root)."""
    logger = logging.getLogger("undertow")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="undertow")
    yield caplog
    logger.removeHandler(caplog.handler)
