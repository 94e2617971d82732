"""Our SentencePiece model as a Hugging Face tokenizer that encodes exactly like it.

`write_hf_tokenizer(spm_path, out_dir)` writes, beside the model weights:

    tokenizer.json          a `tokenizers` pipeline rebuilt from the SentencePiece BPE model
                            (normalizer, BPE model with byte fallback, decoder),
                            loaded by stock transformers (`AutoTokenizer`) without sentencepiece
    tokenizer_config.json   class and special tokens (bos/eos/unk/pad); adds no BOS/EOS when
                            encoding, like `undertow.data_prep.tokenizer.Tokenizer.encode`
    tokenizer.model         the SentencePiece file itself (what `from-hf` imports back)

How the pieces correspond: SentencePiece BPE merges, at every step, the adjacent pair whose
joined piece has the best score; a `tokenizers` BPE applies the merge of lowest rank. Ranking
every (left, right) split of each piece by that piece's score gives the same choices. The
rebuilt tokenizer is checked against SentencePiece on a sample text (and any text the caller
adds) before anything is written; a difference is an error, never a silent approximation.

Refused: unigram models, user-defined symbols together with the dummy prefix, and normalizer
options without a `tokenizers` counterpart (see `_check_supported`). Known and accepted
difference: the control pieces' strings (`<s>`, `</s>`, `<pad>`) typed in plain text become the
special tokens in transformers, while SentencePiece spells them out.
"""

from __future__ import annotations

import json
import os
import shutil

SPIECE_SPACE = "\u2581"
TOKENIZER_MODEL = "tokenizer.model"
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"

# SentencePiece piece types (sentencepiece_model.proto, ModelProto.SentencePiece.Type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
BPE = 2

SAMPLE_TEXT = (
    "The state of a recurrent model carries what it has read so far.\n"
    "  Indented line\twith a tab, and   runs of   spaces;\n\n"
    "def scan(x, h0=None):\n    return [h * 0.5 + 1024 for h in x]  # 3.14159, 2026-11-26\n"
    "Unicode: café naïve Ünïcödé — “quotes” 漢字 日本語 한국어 Ελληνικά русский 🙂🚀\n"
    " leading space, trailing space \n"
    "UPPER lower MiXeD 007 x²+y²=z² €100 <tag attr=\"v\"/> {json: [1, 2]} ~!@#$%^&*()_+|\n"
)


class TokenizerExportError(ValueError):
    """The SentencePiece model cannot be expressed exactly as a Hugging Face tokenizer."""


def _load_proto(spm_path: str):
    from sentencepiece import sentencepiece_model_pb2

    if not os.path.isfile(spm_path):
        raise FileNotFoundError(f"tokenizer model {spm_path!r} does not exist")
    proto = sentencepiece_model_pb2.ModelProto()
    with open(spm_path, "rb") as f:
        proto.ParseFromString(f.read())
    return proto


def _check_supported(proto, spm_path: str) -> None:
    norm, trainer = proto.normalizer_spec, proto.trainer_spec
    problems = []
    if trainer.model_type != BPE:
        problems.append(f"model_type {trainer.model_type} (only BPE, 2, converts: the unigram Viterbi of "
                        "`tokenizers` breaks ties in whitespace runs differently from SentencePiece)")
    if norm.remove_extra_whitespaces:
        problems.append("remove_extra_whitespaces = true (train with it off: undertow's default)")
    if trainer.treat_whitespace_as_suffix:
        problems.append("treat_whitespace_as_suffix = true")
    if not norm.escape_whitespaces:
        problems.append("escape_whitespaces = false")
    users = [p.piece for p in proto.pieces if p.type == USER_DEFINED]
    if users and norm.add_dummy_prefix:
        problems.append(f"user-defined symbols {users[:4]} with add_dummy_prefix: `tokenizers` normalizes the text "
                        "between added tokens section by section, so it would add the dummy prefix after every "
                        "symbol where SentencePiece adds it once")
    if problems:
        raise TokenizerExportError(f"{spm_path}: cannot be rebuilt exactly as a Hugging Face tokenizer: "
                                   + "; ".join(problems))


def _bpe_merges(pieces) -> list[tuple[str, str]]:
    """Every (left, right) split of each mergeable piece into two vocabulary pieces, best piece first.

    `pieces` is the model's piece list; a BPE model's scores fall with the id, so sorting by
    score (ties by id) is the order in which SentencePiece prefers the joined pieces.
    """
    mergeable = {p.piece for p in pieces if p.type in (NORMAL, USER_DEFINED)}
    ranked = sorted(((-p.score, i, p.piece) for i, p in enumerate(pieces) if p.type == NORMAL))
    merges = []
    for _, _, piece in ranked:
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                merges.append((left, right))
    return merges


def _build(proto):
    """A `tokenizers.Tokenizer` that mirrors the SentencePiece model in `proto`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    pieces = proto.pieces
    unk = pieces[proto.trainer_spec.unk_id].piece
    byte_fallback = proto.trainer_spec.byte_fallback
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=_bpe_merges(pieces), unk_token=unk, fuse_unk=True,
                               byte_fallback=byte_fallback))

    norm = proto.normalizer_spec
    steps = []
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend(SPIECE_SPACE))
    steps.append(normalizers.Replace(" ", SPIECE_SPACE))
    tok.normalizer = normalizers.Sequence(steps)

    steps = [decoders.Replace(SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if norm.add_dummy_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(steps)

    specials = [AddedToken(p.piece, special=True, normalized=False) for p in pieces if p.type in (UNKNOWN, CONTROL)]
    users = [AddedToken(p.piece, special=False, normalized=False) for p in pieces if p.type == USER_DEFINED]
    tok.add_special_tokens(specials)
    tok.add_tokens(users)
    return tok


def _check_same(proto, tok, texts: list[str], spm_path: str) -> None:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(proto.SerializeToString())
    for text in texts:
        for line in [text, *text.split("\n")]:
            want = sp.encode(line, out_type=int)
            got = tok.encode(line, add_special_tokens=False).ids
            if got != want:
                raise TokenizerExportError(
                    f"{spm_path}: the rebuilt Hugging Face tokenizer encodes {line[:80]!r} differently "
                    f"({got[:16]}... vs SentencePiece {want[:16]}...); refusing to write a tokenizer that "
                    "does not match the one the model was trained with"
                )


def _special(proto, piece_id: int) -> str | None:
    return proto.pieces[piece_id].piece if 0 <= piece_id < len(proto.pieces) else None


def write_hf_tokenizer(spm_path: str, out_dir: str, check_texts: tuple[str, ...] = ()) -> dict:
    """Write tokenizer.json, tokenizer_config.json and tokenizer.model into `out_dir`.

    The rebuilt tokenizer must encode SAMPLE_TEXT and `check_texts` (whole and line by line)
    exactly like SentencePiece, else TokenizerExportError. Returns the special tokens by role.
    """
    proto = _load_proto(spm_path)
    _check_supported(proto, spm_path)
    tok = _build(proto)
    _check_same(proto, tok, [SAMPLE_TEXT, *check_texts], spm_path)

    spec = proto.trainer_spec
    roles = {"bos_token": spec.bos_id, "eos_token": spec.eos_id, "unk_token": spec.unk_id, "pad_token": spec.pad_id}
    specials = {role: _special(proto, i) for role, i in roles.items()}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **{role: piece for role, piece in specials.items() if piece is not None},
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000_000,
    }
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, TOKENIZER_JSON))
    with open(os.path.join(out_dir, TOKENIZER_CONFIG), "w") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
    dest = os.path.join(out_dir, TOKENIZER_MODEL)
    if os.path.abspath(spm_path) != os.path.abspath(dest):
        shutil.copyfile(spm_path, dest)
    return specials
