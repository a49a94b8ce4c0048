"""Command-line plumbing shared by ``loramix`` subcommands: "did you mean" on a mistyped command
or option, and errors as a JSON object on stdout for ``--json`` runs.

A failed ``--json`` run prints one JSON document on stdout (scripts parse stdout only), the same
one-line message on stderr, and exits non-zero::

    {"error": {"type": "OutputError", "message": "output /x exists; pass --overwrite ..."},
     "exit_code": 1}
"""
from __future__ import annotations

import argparse
import json
import re
import sys

USAGE_EXIT = 2


def suggest(word: str, choices) -> str | None:
    """The closest of ``choices`` to ``word`` (difflib, cutoff 0.6), or None."""
    import difflib   # only on a usage error: not on every start

    hits = difflib.get_close_matches(word, sorted(set(choices)), n=1, cutoff=0.6)
    return hits[0] if hits else None


def _option_strings(parser: argparse.ArgumentParser) -> set[str]:
    """Every long option of ``parser`` and its subcommands (argparse reports an unknown option
    from the top parser, after the subcommand's parser gave up on it)."""
    out = set()
    for a in parser._actions:   # argparse keeps no public list; stable since Python 3.2
        out.update(s for s in a.option_strings if s.startswith("--"))
        if isinstance(a, argparse._SubParsersAction):
            for sub in a.choices.values():
                out |= _option_strings(sub)
    return out


def json_wanted(argv) -> bool:
    """Whether the command line asks for JSON output (``--json`` anywhere before ``--``)."""
    args = list(argv)
    return "--json" in (args[: args.index("--")] if "--" in args else args)


def print_json_error(message: str, kind: str, code: int) -> None:
    """The JSON error object on stdout (for ``--json`` runs)."""
    print(json.dumps({"error": {"type": kind, "message": message}, "exit_code": code}, indent=1))
    sys.stdout.flush()


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose usage errors suggest the nearest command or option and,
    when ``json_errors`` is set on the top parser, also print the JSON error object."""

    json_errors = False
    root: "Parser | None" = None

    def error(self, message: str):
        top = self.root or self
        m = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if m:
            choices = re.findall(r"'([^']*)'", m.group(2)) or [c.strip() for c in m.group(2).split(",")]
            hit = suggest(m.group(1), choices)
            if hit:
                message += f"; did you mean '{hit}'?"
        m = re.search(r"unrecognized arguments: (.*)", message)
        if m:
            hints = []
            for tok in m.group(1).split():
                if tok.startswith("--"):
                    hit = suggest(tok.split("=")[0], _option_strings(top))
                    if hit:
                        hints.append((tok.split("=")[0], hit))
            if len(hints) == 1:
                message += f"; did you mean {hints[0][1]}?"
            elif hints:
                message += "; did you mean " + ", ".join(f"{h} (for {t})" for t, h in hints) + "?"
        if top.json_errors:
            print_json_error(f"{self.prog}: {message}", "UsageError", USAGE_EXIT)
        self.print_usage(sys.stderr)
        self.exit(USAGE_EXIT, f"{self.prog}: error: {message}\n")

    def add_subparsers(self, **kw):
        action = super().add_subparsers(**kw)
        root = self.root or self
        add = action.add_parser

        def add_parser(name, **k):
            p = add(name, **k)
            if isinstance(p, Parser):
                p.root = root
            return p

        action.add_parser = add_parser
        return action
