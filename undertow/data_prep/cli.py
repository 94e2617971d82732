"""`undertow prep {tokenizer,shards,megatron,embedded}`: the data preparation commands.

    undertow prep tokenizer data/*.jsonl --out tok.model --vocab-size 32000
    undertow prep shards data/*.jsonl --tokenizer tok.model --out shards/ --workers 8
    undertow prep megatron data/*.jsonl --tokenizer tok.model --out mega/corpus
    undertow prep megatron --from-shards shards/ --out mega/corpus
    undertow prep embedded            # prints the cached shard dir of the embedded corpus

`add_prep_parser(subparsers)` registers them; each sets `func(args) -> exit code`.
Bad arguments and bad inputs exit with code 2 and one `error:` line on stderr.
"""

from __future__ import annotations

import argparse
import functools
import sys
from typing import Callable

from undertow.data_prep.sources import FORMATS, TEXT_SPLITS


def _reports_errors(cmd: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn the clear errors of data prep into an `error:` line and exit code 2, not a traceback."""

    @functools.wraps(cmd)
    def run(args: argparse.Namespace) -> int:
        try:
            return cmd(args)
        except (ValueError, FileNotFoundError, ImportError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    return run


def _input_options() -> argparse.ArgumentParser:
    """Options every command that reads raw inputs shares."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--format", dest="fmt", default="auto", choices=FORMATS,
                   help="input format; auto picks by suffix (.txt/.md, .jsonl, .parquet; .gz for text and jsonl)")
    p.add_argument("--field", default="text", help="JSON key / Parquet column that holds the text (default: text)")
    p.add_argument("--text-split", default="file", choices=TEXT_SPLITS,
                   help="documents in text files: one per file, per blank-line-separated paragraph, or per line")
    return p


def _token_options() -> argparse.ArgumentParser:
    """Options of the commands that tokenize documents into ids."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--workers", type=int, default=1,
                   help="tokenizer processes (output bytes do not depend on it; default 1)")
    p.add_argument("--no-eos", dest="append_eos", action="store_false", help="do not append EOS to each document")
    p.add_argument("--bos", dest="add_bos", action="store_true", help="put BOS before each document")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    return p


@_reports_errors
def cmd_tokenizer(args: argparse.Namespace) -> int:
    from undertow.data_prep.sources import Sources, SkipCounter
    from undertow.data_prep.tokenizer import train_tokenizer

    sources = Sources(args.inputs, fmt=args.fmt, field=args.field, text_split=args.text_split)
    skips = SkipCounter()
    tok = train_tokenizer(
        (doc.text for doc in sources.documents(skips)), args.out, vocab_size=args.vocab_size,
        model_type=args.model_type, byte_fallback=args.byte_fallback, character_coverage=args.character_coverage,
        user_symbols=args.user_symbols, unk_id=args.unk_id, bos_id=args.bos_id, eos_id=args.eos_id,
        pad_id=args.pad_id, input_sentence_size=args.input_sentence_size,
        max_sentence_length=args.max_sentence_length, normalization=args.normalization,
        split_digits=args.split_digits, seed=args.seed, num_threads=args.threads)
    print(f"wrote {args.out}: {args.model_type}, vocab {tok.vocab_size}, sha256 {tok.sha256}; "
          f"skipped inputs: {skips.summary()}")
    return 0


@_reports_errors
def cmd_shards(args: argparse.Namespace) -> int:
    from undertow.data_prep.pipeline import summary_line
    from undertow.data_prep.shards import prepare_shards

    m = prepare_shards(args.inputs, args.tokenizer, args.out, shard_tokens=args.shard_tokens, workers=args.workers,
                       dtype=args.dtype, append_eos=args.append_eos, add_bos=args.add_bos, fmt=args.fmt,
                       field=args.field, text_split=args.text_split, overwrite=args.overwrite,
                       copy_tokenizer=args.copy_tokenizer, progress=args.progress, min_shards=args.min_shards,
                       max_doc_tokens=args.max_doc_tokens)
    print(f"{args.out}: {summary_line(m['documents'], m['tokens'], m['skipped'], len(m['shards']))}")
    return 0


@_reports_errors
def cmd_megatron(args: argparse.Namespace) -> int:
    from undertow.data_prep.megatron import megatron_from_shards, write_megatron
    from undertow.data_prep.pipeline import summary_line

    if bool(args.inputs) == bool(args.from_shards):
        raise ValueError("give either input files or --from-shards DIR, not both and not neither")
    if args.from_shards:
        record = megatron_from_shards(args.from_shards, args.out, progress=args.progress)
    elif not args.tokenizer:
        raise ValueError("--tokenizer is required when tokenizing input files")
    else:
        record = write_megatron(args.inputs, args.tokenizer, args.out, workers=args.workers,
                                append_eos=args.append_eos, add_bos=args.add_bos, fmt=args.fmt, field=args.field,
                                text_split=args.text_split, progress=args.progress)
    print(f"{args.out}.bin/.idx: {summary_line(record['documents'], record['tokens'], record['skipped'])}")
    return 0


@_reports_errors
def cmd_embedded(args: argparse.Namespace) -> int:
    from undertow.data_prep.corpus import ensure_embedded_dataset

    print(ensure_embedded_dataset(args.cache_dir, vocab_size=args.vocab_size, shard_tokens=args.shard_tokens,
                                  workers=args.workers))
    return 0


def _add_tokenizer(sub, inputs: argparse.ArgumentParser) -> None:
    p = sub.add_parser("tokenizer", parents=[inputs], help="train a SentencePiece tokenizer",
                       description="Train a SentencePiece model (deterministic: same inputs and options give the "
                                   "same file) on the first --input-sentence-size lines of the inputs.")
    p.add_argument("inputs", nargs="+", help="input files or glob patterns (globs expand in sorted order)")
    p.add_argument("--out", required=True, help="path of the .model file to write")
    p.add_argument("--vocab-size", type=int, required=True, help="pieces in the vocabulary, specials included")
    p.add_argument("--model-type", default="bpe", choices=("bpe", "unigram"), help="SentencePiece algorithm")
    p.add_argument("--character-coverage", type=float, default=0.9995,
                   help="share of characters that get their own piece (default 0.9995)")
    p.add_argument("--no-byte-fallback", dest="byte_fallback", action="store_false",
                   help="no byte pieces: unseen characters become <unk> instead of UTF-8 bytes")
    p.add_argument("--user-symbols", type=lambda s: [x for x in s.split(",") if x], default=[],
                   help="comma-separated pieces always kept whole, e.g. '<|user|>,<|assistant|>'")
    for name, default in (("unk", 0), ("bos", 1), ("eos", 2), ("pad", 3)):
        p.add_argument(f"--{name}-id", type=int, default=default,
                       help=f"id of the {name.upper()} piece (default {default}" + (")" if name == "unk" else "; -1: none)"))
    p.add_argument("--input-sentence-size", type=int, default=1_000_000,
                   help="train on the first N non-blank lines (default 1,000,000)")
    p.add_argument("--max-sentence-length", type=int, default=16384,
                   help="bytes; longer lines are cut at spaces before training (default 16384)")
    p.add_argument("--normalization", default="identity",
                   help="SentencePiece normalization rule: identity (lossless, default), nmt_nfkc, nfkc, ...")
    p.add_argument("--no-split-digits", dest="split_digits", action="store_false",
                   help="let numbers merge into multi-digit pieces")
    p.add_argument("--seed", type=int, default=0, help="SentencePiece random seed (default 0)")
    p.add_argument("--threads", type=int, default=1,
                   help="SentencePiece training threads (default 1; more may make unigram nondeterministic)")
    p.set_defaults(func=cmd_tokenizer)


def _add_shards(sub, inputs: argparse.ArgumentParser, tokens: argparse.ArgumentParser) -> None:
    from undertow.data_prep.shards import DEFAULT_MIN_SHARDS, DEFAULT_SHARD_TOKENS

    p = sub.add_parser("shards", parents=[inputs, tokens], help="tokenize inputs into webdataset shards",
                       description="Tokenize inputs into webdataset .tar shards plus manifest.json. Rerunning an "
                                   "interrupted run with the same options resumes it; the result is "
                                   "byte-identical to an uninterrupted run, for any --workers.")
    p.add_argument("inputs", nargs="+", help="input files or glob patterns (globs expand in sorted order)")
    p.add_argument("--tokenizer", required=True, help="SentencePiece .model file")
    p.add_argument("--out", required=True, help="output directory (created; resumed if it holds an unfinished run)")
    p.add_argument("--shard-tokens", type=int, default=None,
                   help=f"close a shard once it holds this many tokens (default {DEFAULT_SHARD_TOKENS:,}, lowered "
                        "for a small corpus: see --min-shards)")
    p.add_argument("--min-shards", type=int, default=DEFAULT_MIN_SHARDS,
                   help="without --shard-tokens, make shards smaller for a corpus too small to give this many, so "
                        "many ranks and loader workers each read whole files of their own (default 1: never; "
                        "fewer shards than readers is correct, they split shards by document, and one big "
                        "shuffled shard mixes a small corpus best)")
    p.add_argument("--max-doc-tokens", type=int, default=0,
                   help="cut documents longer than this into pieces stored as documents (default 0: never cut; "
                        "the loader interleaves long documents with others anyway, see data.interleave)")
    p.add_argument("--dtype", default="auto", choices=("auto", "uint16", "uint32"),
                   help="token id dtype; auto: the smallest that holds the vocabulary")
    p.add_argument("--overwrite", action="store_true",
                   help="replace shards and manifest already in --out that were made with other settings")
    p.add_argument("--no-copy-tokenizer", dest="copy_tokenizer", action="store_false",
                   help="do not copy the tokenizer into --out (the manifest then names its path)")
    p.set_defaults(func=cmd_shards)


def _add_megatron(sub, inputs: argparse.ArgumentParser, tokens: argparse.ArgumentParser) -> None:
    p = sub.add_parser("megatron", parents=[inputs, tokens], help="write Megatron-LM .bin/.idx",
                       description="Write a Megatron-LM indexed dataset (one sequence per document) through "
                                   "megatron-core, from input files or from a prepared shard directory. "
                                   "Needs: pip install 'undertow[megatron]'.")
    p.add_argument("inputs", nargs="*", help="input files or glob patterns (or use --from-shards)")
    p.add_argument("--from-shards", metavar="DIR", help="convert this `prep shards` directory instead of inputs")
    p.add_argument("--tokenizer", help="SentencePiece .model file (needed with input files)")
    p.add_argument("--out", required=True, help="output prefix: writes PREFIX.bin, PREFIX.idx and PREFIX.json")
    p.set_defaults(func=cmd_megatron)


def _add_embedded(sub) -> None:
    p = sub.add_parser("embedded", help="build the embedded corpus dataset and print its directory",
                       description="Train a BPE tokenizer on the corpus shipped in the package and prepare its "
                                   "shards in the cache (once per settings); print the shard directory.")
    p.add_argument("--cache-dir", default=None, help="cache root (default: $UNDERTOW_CACHE, else $XDG_CACHE_HOME/undertow or ~/.cache/undertow)")
    p.add_argument("--vocab-size", type=int, default=2048, help="tokenizer vocabulary size (default 2048)")
    p.add_argument("--shard-tokens", type=int, default=65536, help="tokens per shard (default 65536)")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    p.set_defaults(func=cmd_embedded)


def add_prep_parser(subparsers) -> argparse.ArgumentParser:
    """Register `prep` and its subcommands on the main CLI's subparsers; return the `prep` parser."""
    prep = subparsers.add_parser("prep", help="prepare data: tokenizer, shards, Megatron .bin/.idx, embedded corpus",
                                 description="Data preparation: train a tokenizer, write token shards or "
                                             "Megatron files, or build the embedded default dataset.")
    sub = prep.add_subparsers(dest="prep_command", required=True, metavar="{tokenizer,shards,megatron,embedded}")
    inputs, tokens = _input_options(), _token_options()
    _add_tokenizer(sub, inputs)
    _add_shards(sub, inputs, tokens)
    _add_megatron(sub, inputs, tokens)
    _add_embedded(sub)
    return prep
