"""The command lines the docs show run as written: each ``python -m <module> ...`` of this
repository (the benchmark scripts, the ahead-of-time compile) found in a code span or block of
README.md, benchmarks/README.md or csrc/README.md, or in the code of a script's docstring, is
parsed by that script's own argument parser, so a renamed or removed option, or a value it no
longer takes, fails here rather than in a user's shell. Only the parsing runs: the test stops
each script right after its ``parse_args`` (nothing is timed, compiled or written)."""
from __future__ import annotations

import argparse
import ast
import importlib
import re
import shlex
from pathlib import Path
from typing import List, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "benchmarks/README.md", "csrc/README.md")
# A command of this repository: python -m benchmarks.<script> or a patnet_kernels module.
COMMAND = re.compile(r"python3? -m ((?:benchmarks|patnet_kernels)(?:\.\w+)+)(.*)")


def _code_pieces(text: str) -> List[str]:
    """The code of a markdown text: each line of a fenced block, each inline code span (its
    line breaks read as spaces)."""
    pieces, rest = [], []
    for i, part in enumerate(re.split(r"^```[^\n]*\n", text, flags=re.M)):
        (pieces.extend(part.splitlines()) if i % 2 else rest.append(part))
    for part in rest:
        pieces.extend(span.replace("\n", " ") for span in re.findall(r"`([^`]+)`", part))
    return pieces


def _arguments(words: List[str]) -> List[str]:
    """A documented command's words as its argv: a usage line's "[--option VALUE]" as the
    option given, "a|b" as its first choice, "..." right after an option as a value for it
    (a placeholder, see :func:`_fill_placeholders`) and elsewhere (more of the same) as
    nothing."""
    argv = []
    for before, word in zip([""] + words, words):
        if word != "...":
            argv.append(word.strip("[]").split("|")[0])
        elif before.startswith("--"):
            argv.append("VALUE")
    return argv


def _docstring_lines(path: Path) -> List[str]:
    """The code of a script's module docstring: its ``literal`` spans and its indented lines."""
    text = ast.get_docstring(ast.parse(path.read_text())) or ""
    return ([span.replace("\n", " ") for span in re.findall(r"``([^`]+)``", text)]
            + [line for line in text.splitlines() if line.startswith("    ")])


def _options(parser: argparse.ArgumentParser) -> dict:
    """Option string -> action, of a parser and its subcommands' parsers."""
    options = dict(parser._option_string_actions)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                options.update(_options(sub))
    return options


def _fill_placeholders(parser: argparse.ArgumentParser, argv: List[str]) -> List[str]:
    """argv with each placeholder value (N, PATH, SECONDS...: capitals) given to an option
    replaced by one the option takes: its first choice, 1 for a number, else a word."""
    options, filled = _options(parser), []
    for before, word in zip([""] + argv, argv):
        action = options.get(before)
        if action is not None and re.fullmatch(r"[A-Z][A-Z0-9_]*", word):
            word = (str(list(action.choices)[0]) if action.choices
                    else "1" if action.type in (int, float) else "x")
        filled.append(word)
    return filled


def _commands() -> List[Tuple[str, str, List[str]]]:
    """(where, module, argv) of every command of this repository the docs show, and the
    scripts' docstrings (a line each)."""
    found = []
    scripts = sorted((ROOT / "benchmarks").glob("*.py")) + [ROOT / "patnet_kernels/triton/aot.py"]
    sources = [(doc, _code_pieces((ROOT / doc).read_text())) for doc in DOCS] + [
        (str(path.relative_to(ROOT)), _docstring_lines(path)) for path in scripts]
    for doc, pieces in sources:
        for piece in pieces:
            match = COMMAND.search(piece)
            if not match:
                continue
            # (up to a shell comment, a second command or a pipe; "$OUT" stands for a folder)
            line = re.split(r"\s(?:#|&&|\||;)", match.group(2))[0]
            found.append((f"{doc}: {piece.strip()[:80]}", match.group(1),
                          _arguments(shlex.split(line.replace("$OUT", "out")))))
    return found


COMMANDS = _commands()


class _Parsed(Exception):
    """Raised right after a script's arguments were parsed: the test stops it there."""


def test_docs_show_commands():
    """The extraction finds the docs' commands (it would pass vacuously on none)."""
    modules = {module for _, module, _ in COMMANDS}
    assert len(COMMANDS) >= 30 and {"benchmarks.traffic", "benchmarks.bench_models",
                                    "patnet_kernels.triton.aot"} <= modules, sorted(modules)


@pytest.mark.parametrize("where, module, argv", COMMANDS,
                         ids=[f"{m.split('.')[-1]}-{i}" for i, (_, m, _) in enumerate(COMMANDS)])
def test_documented_command_parses(where, module, argv, monkeypatch):
    """The script takes every option and value the docs give it."""
    parse_args = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(parse_args(self, _fill_placeholders(self, args), namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    script = importlib.import_module(module)
    with pytest.raises(_Parsed):
        try:
            script.main(argv)
        except SystemExit as exc:  # (argparse's error: it printed the reason)
            pytest.fail(f"{where}\n`python -m {module} {shlex.join(argv)}` is refused by its "
                        f"parser (exit {exc.code}); mend the README or the script")
