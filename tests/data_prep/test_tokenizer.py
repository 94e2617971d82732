"""Tokenizer training (bpe, unigram), special ids, byte fallback, determinism, dtype checks."""

import numpy as np
import pytest

from undertow.data_prep.tokenizer import Tokenizer, resolve_token_dtype, train_tokenizer, training_sentences

from .conftest import make_texts

TEXTS = make_texts(300, seed=1)


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_train_load_special_ids_and_determinism(tmp_path, model_type):
    a, b = str(tmp_path / "a.model"), str(tmp_path / "b.model")
    tok = train_tokenizer(TEXTS, a, vocab_size=320, model_type=model_type, user_symbols=["<|sep|>"])
    train_tokenizer(TEXTS, b, vocab_size=320, model_type=model_type, user_symbols=["<|sep|>"])
    assert open(a, "rb").read() == open(b, "rb").read()  # same input + settings -> same file

    loaded = Tokenizer.load(a)
    assert loaded.sha256 == tok.sha256 and loaded.vocab_size == 320
    assert (loaded.unk_id, loaded.bos_id, loaded.eos_id, loaded.pad_id) == (0, 1, 2, 3)
    assert [loaded.id_to_piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<pad>"]
    text = "the state carries 1024 tokens\n  through a gate <|sep|> while scans run"
    ids = loaded.encode(text)
    assert loaded.decode(ids) == text  # lossless: identity normalization, whitespace kept
    assert loaded.encode("<|sep|>")[-1] == loaded.encode("a<|sep|>")[-1]  # user symbol stays one piece
    assert all(loaded.id_to_piece(i) not in ("1024", "102") for i in ids)  # digits are split


def test_byte_fallback_for_unseen_characters(tmp_path):
    tok = train_tokenizer(TEXTS, str(tmp_path / "t.model"), vocab_size=400)
    text = "gate 漢字 ok é"
    ids = tok.encode(text)
    assert tok.unk_id not in ids and tok.decode(ids) == text
    assert "<0xE6>" in [tok.id_to_piece(i) for i in ids]
    plain = train_tokenizer(TEXTS, str(tmp_path / "u.model"), vocab_size=200, byte_fallback=False)
    assert plain.unk_id in plain.encode("漢")


def test_custom_ids_and_disabled_pad(tmp_path):
    tok = train_tokenizer(TEXTS, str(tmp_path / "t.model"), vocab_size=300, bos_id=-1, eos_id=1, pad_id=-1)
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, -1, 1, -1)


@pytest.mark.parametrize("kwargs, message", [
    ({"vocab_size": 0}, "vocab_size must be a positive integer"),
    ({"vocab_size": 300, "model_type": "wordpiece"}, "model_type 'wordpiece' is not one of"),
    ({"vocab_size": 300, "pad_id": 300}, "pad_id 300 is outside the vocabulary"),
    ({"vocab_size": 300, "eos_id": 1}, "special ids must be distinct"),
    ({"vocab_size": 300, "unk_id": -1}, "unk_id must be >= 0"),
    ({"vocab_size": 300, "character_coverage": 0}, "character_coverage must be in"),
    ({"vocab_size": 100}, "SentencePiece training failed .* vocab_size 100"),  # < 256 bytes + chars
])
def test_training_errors_are_clear(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        train_tokenizer(TEXTS, str(tmp_path / "t.model"), **kwargs)


def test_training_sentences_limit_and_long_lines():
    texts = ["a b\n\n  \nc", "x" * 10 + " " + "y" * 10]
    assert list(training_sentences(texts, limit=2, max_sentence_length=100)) == ["a b", "c"]
    pieces = list(training_sentences(texts[1:], limit=99, max_sentence_length=16))  # the line is 21 bytes
    assert "".join(pieces) == texts[1] and max(len(p.encode()) for p in pieces) <= 16
    assert pieces[:3] == ["xxxx", "xxxx", "xx"]  # cut at the space when there is one
    with pytest.raises(ValueError, match="no training text"):
        train_tokenizer(["  \n"], "unused.model", vocab_size=300)


def test_dtype_must_hold_the_vocabulary(tmp_path):
    assert resolve_token_dtype(65536, "uint16") == np.uint16
    assert resolve_token_dtype(65537, "auto") == np.uint32
    with pytest.raises(ValueError, match="dtype 'uint16' holds token ids below 65536.* vocab_size is 65537"):
        resolve_token_dtype(65537, "uint16")
    with pytest.raises(ValueError, match="dtype 'int8' is not one of"):
        resolve_token_dtype(100, "int8")


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.load(str(tmp_path / "missing.model"))
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="is not a SentencePiece model"):
        Tokenizer.load(str(tmp_path / "junk.model"))
