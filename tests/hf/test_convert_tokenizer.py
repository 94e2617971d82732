"""The exported tokenizer: stock transformers encodes exactly like our SentencePiece model."""

import json

import pytest

transformers = pytest.importorskip("transformers")

from undertow.data_prep.corpus import EMBEDDED_CORPUS  # noqa: E402
from undertow.data_prep.sources import SkipCounter, Sources  # noqa: E402
from undertow.data_prep.tokenizer import Tokenizer, train_tokenizer  # noqa: E402
from undertow.hf import tokenizer as hf_tokenizer  # noqa: E402
from undertow.hf.tokenizer import SAMPLE_TEXT, TokenizerExportError, write_hf_tokenizer  # noqa: E402

from ..data_prep.conftest import make_texts  # noqa: E402


@pytest.fixture(scope="module")
def corpus_texts() -> list[str]:
    """Documents of the embedded corpus: prose, grammar snippets, code, long whitespace runs."""
    docs = Sources([EMBEDDED_CORPUS]).documents(SkipCounter())
    return [next(docs).text for _ in range(160)]


def test_transformers_encodes_like_sentencepiece(tmp_path, corpus_texts):
    spm = str(tmp_path / "bpe.model")
    ours = train_tokenizer(corpus_texts[:120], spm, vocab_size=800)
    out = tmp_path / "hf"
    specials = write_hf_tokenizer(spm, str(out))
    assert specials == {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    assert {p.name for p in out.iterdir()} == {"tokenizer.json", "tokenizer_config.json", "tokenizer.model"}

    hf = transformers.AutoTokenizer.from_pretrained(str(out))
    assert (hf.bos_token_id, hf.eos_token_id, hf.unk_token_id, hf.pad_token_id) == (1, 2, 0, 3)
    held_out = corpus_texts[120:]  # the tokenizer never saw these
    extra = ["", " ", "  two leading", "tabs\t\tand\nnewlines\n\n", "digits 1234567890", "emoji 🙂 and 漢字 é",
             "not a <|sep|> symbol", SAMPLE_TEXT]
    for text in corpus_texts[:40] + held_out + extra:
        ids = hf.encode(text)
        assert ids == ours.encode(text), text[:80]
        assert hf.decode(ids) == ours.decode(ids)


@pytest.mark.parametrize("settings, reason", [
    (dict(model_type="unigram"), "only BPE"),
    (dict(user_symbols=["<|sep|>"]), "user-defined symbols"),
])
def test_tokenizers_without_an_exact_counterpart_are_refused(tmp_path, settings, reason):
    spm = str(tmp_path / "t.model")
    train_tokenizer(make_texts(200), spm, vocab_size=300, **settings)
    with pytest.raises(TokenizerExportError, match=reason):
        write_hf_tokenizer(spm, str(tmp_path / "hf"))
    assert not (tmp_path / "hf").exists()


def test_a_tokenizer_that_would_encode_differently_is_refused(tmp_path, monkeypatch):
    spm = str(tmp_path / "bpe.model")
    train_tokenizer(make_texts(200), spm, vocab_size=300)
    monkeypatch.setattr(hf_tokenizer, "_bpe_merges", lambda pieces: [])  # characters only: not what we encode
    with pytest.raises(TokenizerExportError, match="encodes .* differently"):
        write_hf_tokenizer(spm, str(tmp_path / "hf"))


def test_config_adds_no_special_tokens(tmp_path):
    spm = str(tmp_path / "bpe.model")
    tok = train_tokenizer(make_texts(200), spm, vocab_size=300)
    write_hf_tokenizer(spm, str(tmp_path / "hf"))
    config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is False and config["add_eos_token"] is False
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert hf("the state")["input_ids"] == Tokenizer.load(spm).encode("the state") == tok.encode("the state")
