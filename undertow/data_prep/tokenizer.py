"""SentencePiece tokenizers: deterministic training and a small wrapper for encoding.

`train_tokenizer(texts, path, vocab_size=...)` trains BPE or unigram from an iterable of
documents (e.g. `Sources(...).documents(skips)` mapped to `.text`) and writes the model
file atomically. Defaults follow what LM pretraining wants from a tokenizer: lossless
(identity normalization, whitespace kept, byte fallback for unseen characters), digits
split, ids unk=0 bos=1 eos=2 pad=3.

Determinism: the documents are cut into training sentences (lines) here, in order, and
the first `input_sentence_size` are used (no sampling); SentencePiece runs single
threaded with a fixed seed by default. Same texts + same settings -> the same model file,
byte for byte (tested).

Newlines never appear in training sentences, so with byte fallback a newline encodes as
the byte piece <0x0A> (one token), as in Llama's tokenizer.
"""

from __future__ import annotations

import hashlib
import os
from typing import Iterable, Iterator, Sequence

import numpy as np

from undertow.data_prep.format import token_dtype_for_vocab
from undertow.log import get_logger

log = get_logger("undertow.data_prep.tokenizer")

MODEL_TYPES = ("bpe", "unigram")
DTYPES = ("auto", "uint16", "uint32")


def resolve_token_dtype(vocab_size: int, dtype: str = "auto") -> np.dtype:
    """The numpy dtype for token ids: the smallest that fits for "auto", else `dtype` if it fits.

    Raises ValueError when the vocabulary has ids the requested dtype cannot hold.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {DTYPES}")
    if dtype == "auto":
        return token_dtype_for_vocab(vocab_size)
    np_dtype = np.dtype(dtype)
    capacity = int(np.iinfo(np_dtype).max) + 1
    if vocab_size > capacity:
        raise ValueError(f"dtype {dtype!r} holds token ids below {capacity}, but the tokenizer's vocab_size is "
                         f"{vocab_size}; use dtype 'auto' or 'uint32'")
    return np_dtype


class Tokenizer:
    """A loaded SentencePiece model with the file's sha256 (what a manifest records).

    `encode(text) -> list[int]` adds no BOS/EOS; callers add them where they want them.
    """

    def __init__(self, path: str, model_bytes: bytes):
        import sentencepiece as spm

        self.path = path
        self.sha256 = hashlib.sha256(model_bytes).hexdigest()
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(model_bytes)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{path!r} is not a SentencePiece model file: {e}") from e

    @classmethod
    def load(cls, path: str) -> "Tokenizer":
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer model {path!r} does not exist (train one with `undertow prep tokenizer`)")
        with open(path, "rb") as f:
            return cls(path, f.read())

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()  # -1 when the model has none

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))

    def describe(self, file: str) -> dict:
        """The manifest's "tokenizer" entry, with `file` as the consumer should find it."""
        return {"file": file, "sha256": self.sha256, "vocab_size": self.vocab_size, "unk_id": self.unk_id,
                "bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id}


def _cut(line: str, max_chars: int) -> Iterator[str]:
    """Cut an over-long line at the last space before `max_chars` (or hard, if it has none)."""
    while len(line) > max_chars:
        cut = line.rfind(" ", 1, max_chars)
        cut = cut if cut > 0 else max_chars
        yield line[:cut]
        line = line[cut:]
    if line.strip():
        yield line


def training_sentences(texts: Iterable[str], limit: int, max_sentence_length: int) -> Iterator[str]:
    """The first `limit` non-blank lines of `texts`, lines longer than the byte limit cut up.

    SentencePiece drops sentences over `max_sentence_length` bytes; cutting them instead
    keeps corpora of one-line documents (typical JSONL) usable for training.
    """
    max_chars = max(1, max_sentence_length // 4)  # a UTF-8 character is at most 4 bytes
    n = 0
    for text in texts:
        for line in text.split("\n"):
            if not line.strip():
                continue
            pieces = [line] if len(line.encode("utf-8")) <= max_sentence_length else _cut(line, max_chars)
            for piece in pieces:
                if n >= limit:
                    return
                n += 1
                yield piece


def _check_training_args(vocab_size, model_type, character_coverage, special_ids, user_symbols,
                         input_sentence_size) -> None:
    if not isinstance(vocab_size, int) or vocab_size <= 0:
        raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} is not one of {MODEL_TYPES}")
    if not 0.0 < character_coverage <= 1.0:
        raise ValueError(f"character_coverage must be in (0, 1], got {character_coverage}")
    if special_ids["unk_id"] < 0:
        raise ValueError(f"unk_id must be >= 0 (SentencePiece requires an unknown piece), got {special_ids['unk_id']}")
    used = {k: v for k, v in special_ids.items() if v >= 0}
    for name, value in used.items():
        if value >= vocab_size:
            raise ValueError(f"{name} {value} is outside the vocabulary (vocab_size {vocab_size}); use -1 to disable")
    if len(set(used.values())) != len(used):
        raise ValueError(f"special ids must be distinct (or -1 to disable), got {special_ids}")
    if any(not s for s in user_symbols) or len(set(user_symbols)) != len(user_symbols):
        raise ValueError(f"user_symbols must be distinct non-empty strings, got {list(user_symbols)}")
    if input_sentence_size <= 0:
        raise ValueError(f"input_sentence_size must be positive, got {input_sentence_size}")


def train_tokenizer(
    texts: Iterable[str],
    model_path: str,
    *,
    vocab_size: int,
    model_type: str = "bpe",
    byte_fallback: bool = True,
    character_coverage: float = 0.9995,
    user_symbols: Sequence[str] = (),
    unk_id: int = 0,
    bos_id: int = 1,
    eos_id: int = 2,
    pad_id: int = 3,
    input_sentence_size: int = 1_000_000,
    max_sentence_length: int = 16384,
    normalization: str = "identity",
    split_digits: bool = True,
    seed: int = 0,
    num_threads: int = 1,
) -> Tokenizer:
    """Train a SentencePiece model on `texts` (documents) and write it to `model_path`.

    Args:
        texts: documents; cut into lines, the first `input_sentence_size` lines are used.
        model_path: where the .model file goes (written to a temp name, then renamed).
        vocab_size: number of pieces, special and byte pieces included.
        model_type: "bpe" or "unigram".
        byte_fallback: add the 256 byte pieces so no character is ever unknown.
        character_coverage: share of characters covered by character pieces.
        user_symbols: pieces always kept whole (e.g. "<|im_start|>").
        unk_id, bos_id, eos_id, pad_id: special ids; -1 disables BOS/EOS/PAD.
        normalization: SentencePiece normalization rule ("identity" keeps text as is, "nmt_nfkc", ...).
        split_digits: split numbers into single digits.
        seed, num_threads: SentencePiece's random seed and threads; >1 thread may make
            unigram training nondeterministic.
    Returns the loaded `Tokenizer`.
    """
    import sentencepiece as spm

    special_ids = {"unk_id": unk_id, "bos_id": bos_id, "eos_id": eos_id, "pad_id": pad_id}
    user_symbols = list(user_symbols)
    _check_training_args(vocab_size, model_type, character_coverage, special_ids, user_symbols, input_sentence_size)
    sentences = list(training_sentences(texts, input_sentence_size, max_sentence_length))
    if not sentences:
        raise ValueError("no training text: every input document was skipped or blank")
    log.info("training %s tokenizer, vocab %d, on %d sentences", model_type, vocab_size, len(sentences))

    spm.set_random_generator_seed(seed)
    model = bytearray()

    class _Writer:
        def write(self, data: bytes) -> None:
            model.extend(data)

    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=_Writer(),
            vocab_size=vocab_size, model_type=model_type, byte_fallback=byte_fallback,
            character_coverage=character_coverage, user_defined_symbols=user_symbols,
            input_sentence_size=0, shuffle_input_sentence=False, max_sentence_length=max_sentence_length,
            normalization_rule_name=normalization, remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True, split_digits=split_digits,
            num_threads=num_threads, minloglevel=1, **special_ids,
        )
    except RuntimeError as e:
        raise ValueError(f"SentencePiece training failed ({model_type}, vocab_size {vocab_size}): {e}") from e

    out_dir = os.path.dirname(os.path.abspath(model_path))
    os.makedirs(out_dir, exist_ok=True)
    tmp = f"{model_path}.tmp"
    with open(tmp, "wb") as f:
        f.write(bytes(model))
    os.replace(tmp, model_path)
    return Tokenizer(model_path, bytes(model))
