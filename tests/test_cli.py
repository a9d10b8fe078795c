"""Every flag of every script rejects a bad value before any work starts: exit code 2, one line naming the flag.

The flags are found by walking each script's real parser (its parse_args(argv)), so a flag added later without a
check (a `type=` from runtime.py, or `choices`) fails test_every_flag_rejects_a_bad_value.
"""
import argparse
import importlib
from pathlib import Path

import pytest
import torch

import runtime

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = [s for s in ("train", "sample", "data", "bench", "model", "mixing") if (ROOT / f"{s}.py").is_file()]

# Flags where no value is wrong, each with the reason.
NO_BAD_VALUE = {
    ("sample", "--prompt"): "any text is a question",
    ("sample", "--system"): "any text is a system prompt ('' for none)",
    ("data prepare", "--field"): "any name can be a field; prepare names the record that lacks it",
}


class Captured(Exception):
    pass


def parser_of(script, monkeypatch):
    """The ArgumentParser that script.parse_args builds, caught before it parses anything."""
    module = importlib.import_module(script)

    def capture(self, *args, **kwargs):
        raise Captured(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    try:
        module.parse_args([])
    except Captured as e:
        return module, e.args[0]
    finally:
        monkeypatch.undo()
    raise AssertionError(f"{script}.parse_args did not call ArgumentParser.parse_args")


def leaf_parsers(parser, prefix=()):
    """(argv prefix, parser) for a parser and each of its subcommands."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield list(prefix), parser
    for action in subs:
        for name, sub in action.choices.items():
            yield from leaf_parsers(sub, (*prefix, name))


def bad_value(action):
    """A value the flag must reject, or None when it has no check."""
    if action.choices is not None:
        return "no-such-choice"
    return getattr(action.type, "invalid", None)


def cases(monkeypatch):
    """[(script, argv prefix, action)] of every flag that takes a value, and the script's parser module."""
    out = []
    for script in SCRIPTS:
        module, parser = parser_of(script, monkeypatch)
        assert isinstance(parser, runtime.ArgumentParser), f"{script}.py: use runtime.ArgumentParser (one-line errors)"
        for prefix, leaf in leaf_parsers(parser):
            for action in leaf._actions:
                if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) or action.nargs == 0:
                    continue  # --help, subcommands and on/off switches take no value
                out.append((script, module, prefix, leaf, action))
    return out


def argv_with(prefix, action, leaf_positionals, value):
    if action.option_strings:
        return [*prefix, action.option_strings[0], value]
    # positionals: the bad one in its place, the others a path that does not exist (accepted until opened)
    return [*prefix, *(value if a is action else "does-not-exist" for a in leaf_positionals)]


def test_every_flag_rejects_a_bad_value(monkeypatch, capsys):
    found, unchecked, wrong = cases(monkeypatch), [], []
    assert len(found) > 60  # train, sample, data's three subcommands, bench, model export
    for script, module, prefix, leaf, action in found:
        name = " ".join([script, *prefix])
        flag = action.option_strings[0] if action.option_strings else action.metavar or action.dest
        bad = bad_value(action)
        if bad is None:
            if (name, flag) not in NO_BAD_VALUE:
                unchecked.append(f"{name} {flag}")
            continue
        positionals = [a for a in leaf._actions if not a.option_strings
                       and not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]
        argv = argv_with(prefix, action, positionals, bad)
        capsys.readouterr()
        try:
            module.parse_args(argv)
            wrong.append(f"{name} {flag} {bad}: accepted")
            continue
        except SystemExit as e:
            code = e.code
        err = capsys.readouterr().err.strip()
        if code != 2 or not err.startswith("error: ") or "\n" in err or flag not in err:
            wrong.append(f"{name} {flag} {bad}: exit {code}, stderr {err!r}")
    assert not unchecked, f"flags without a check (a type= from runtime.py, or choices): {unchecked}"
    assert not wrong, "\n".join(wrong)
    assert {(s, f) for s, f in NO_BAD_VALUE} <= {(" ".join([s, *p]), a.option_strings[0]) for s, _, p, _, a in found
                                                  if a.option_strings}, "NO_BAD_VALUE names a flag that is gone"


def test_a_flag_without_a_check_is_found():
    """The walk above would notice a new `type=int` flag: it has no bad value to try."""
    parser = runtime.ArgumentParser(prog="x.py")
    unchecked = parser.add_argument("--steps", type=int)
    checked = parser.add_argument("--rows", type=runtime.number(int, at_least=1))
    assert bad_value(unchecked) is None and bad_value(checked) == "0"


@pytest.mark.parametrize("kind, ok, bad", [
    (runtime.number(int, at_least=1), ["1", "4096"], ["0", "-3", "1.5", "x"]),
    (runtime.number(float, above=0), ["1e-3", "2"], ["0", "-1", "nan", "inf", "x"]),
    (runtime.number(float, at_least=0, below=1), ["0", "0.999"], ["1", "-0.1"]),
    (runtime.number(float, above=0, at_most=1), ["1", "0.95"], ["0", "1.01"]),
])
def test_number_bounds(kind, ok, bad):
    for text in ok:
        kind(text)
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError):
            kind(text)


def test_paths_of_the_wrong_kind(tmp_path):
    (tmp_path / "file.jsonl").write_text("{}\n")
    runtime.path("dir")(str(tmp_path))
    runtime.path("file", (".jsonl",))(str(tmp_path / "file.jsonl"))
    runtime.path("new")(str(tmp_path / "not-yet"))
    for kind, text in [(runtime.path("dir"), tmp_path / "file.jsonl"), (runtime.path("file"), tmp_path),
                       (runtime.path("new"), tmp_path / "file.jsonl"), (runtime.path("file", (".txt",)), "a.csv")]:
        with pytest.raises(argparse.ArgumentTypeError):
            kind(str(text))


@pytest.mark.skipif(torch.cuda.is_available() and torch.backends.mps.is_available(), reason="has every device")
@pytest.mark.parametrize("script", ["train", "sample"])
def test_a_missing_device_is_named_with_the_ones_there_are(script, capsys):
    missing = "mps" if torch.cuda.is_available() else "cuda"
    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as e:
        module.main(["--device", missing])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and f"no {missing.upper()} device" in err
    assert "available: " + ", ".join(runtime.available_devices()) in err


@pytest.mark.parametrize("script, argv, says", [
    ("train", ["--lr", "-1"], "--lr: must be > 0, got -1"),
    ("train", ["--warmup-steps", "-3"], "--warmup-steps: must be >= 0"),
    ("train", ["--kd-temperature", "0"], "--kd-temperature: must be > 0"),
    ("train", ["--device", "mps" if not torch.backends.mps.is_available() else "cuda:99"], "--device"),
    ("train", ["--size", "toy", "--data", "d", "--out-dir", "o"], "--mixture"),
    ("data", ["mix", "--mixture", "toy", "--rows", "0"], "--rows: must be >= 1"),
    ("data", ["mix", "--mixture", "toy", "--seq-len", "0"], "--seq-len: must be >= 1"),
    ("data", ["mix", "--mixture", "nope"], "unknown mixture 'nope'"),
    ("sample", ["--top-p", "0"], "--top-p"),
    ("sample", ["--eval-file", "x.jsonl", "--chat"], "--eval-file scores a file"),
])
def test_reported_tracebacks_are_one_line(script, argv, says, capsys):
    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as e:
        module.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: ") and "\n" not in err and says in err, err
