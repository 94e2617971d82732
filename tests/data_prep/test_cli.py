"""`undertow prep ...` through add_prep_parser: help everywhere, each command end to end, clear errors."""

import argparse
import importlib.util
import os

import pytest

from undertow.data_prep.cli import add_prep_parser
from undertow.data_prep.format import read_manifest


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="undertow")
    add_prep_parser(p.add_subparsers(dest="command", required=True))
    return p


def run(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    return args.func(args)


def test_every_option_has_help():
    prep = next(a for a in parser()._subparsers._group_actions[0].choices.values())
    commands = prep._subparsers._group_actions[0].choices
    assert set(commands) == {"tokenizer", "shards", "megatron", "embedded"}
    for name, command in commands.items():
        for action in command._actions:
            assert action.help, f"prep {name} {action.option_strings or action.dest} has no help text"
        assert command.get_default("func") is not None


def test_commands_end_to_end(tmp_path, corpus, capsys):
    model, shards = str(tmp_path / "tok.model"), str(tmp_path / "shards")
    assert run(["prep", "tokenizer", corpus, "--out", model, "--vocab-size", "320", "--model-type", "unigram",
                "--user-symbols", "<a>,<b>", "--pad-id", "-1"]) == 0
    assert "vocab 320" in capsys.readouterr().out
    assert run(["prep", "shards", corpus, "--tokenizer", model, "--out", shards, "--shard-tokens", "1000",
                "--bos", "--no-progress"]) == 0
    assert "120 documents" in capsys.readouterr().out
    manifest = read_manifest(shards)
    assert manifest["settings"]["add_bos"] and manifest["tokenizer"]["pad_id"] == -1

    if importlib.util.find_spec("megatron") is not None:
        assert run(["prep", "megatron", "--from-shards", shards, "--out", str(tmp_path / "m" / "c"),
                    "--no-progress"]) == 0
        assert os.path.exists(tmp_path / "m" / "c.idx") and "120 documents" in capsys.readouterr().out

    assert run(["prep", "embedded", "--cache-dir", str(tmp_path / "cache"), "--vocab-size", "400"]) == 0
    printed = capsys.readouterr().out.strip()
    assert read_manifest(printed)["complete"] and printed.startswith(str(tmp_path / "cache"))


@pytest.mark.parametrize("argv, message", [
    (["prep", "shards", "missing-*.jsonl", "--tokenizer", "t.model", "--out", "o"], "matches no file"),
    (["prep", "megatron", "--out", "o"], "either input files or --from-shards"),
    (["prep", "megatron", "x.jsonl", "--out", "o"], "--tokenizer is required"),
    (["prep", "tokenizer", "{corpus}", "--out", "t.model", "--vocab-size", "50"], "SentencePiece training failed"),
])
def test_errors_exit_2_with_one_line(tmp_path, monkeypatch, corpus, capsys, argv, message):
    if "megatron" in argv and importlib.util.find_spec("megatron") is None:
        pytest.skip("megatron-core not installed")
    monkeypatch.chdir(tmp_path)
    assert run([a.format(corpus=corpus) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
