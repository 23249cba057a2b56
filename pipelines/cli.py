"""The single `gr3d` console script.

Each command lives in the module that owns it, as `add_parser(subparsers)` registering `run(args) -> int`.
Those modules import nothing heavy at module level, so `gr3d --help` stays fast.

Conventions every command gets from here (tests/test_cli.py checks them on the whole parser tree):
- `gr3d --version` prints the installed package version;
- every option shows its default in `--help` (`DefaultsHelpFormatter`, set on every sub-parser);
- a missing or unreadable input is one line on stderr naming the file, exit 2 (`schemas.cli_errors`).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Any

from schemas.cli_errors import EXIT_INTERRUPTED, EXIT_USAGE, input_error_line

# Modules that register top-level commands, in the order `--help` lists them.
COMMAND_MODULES: list[str] = [
    "pipelines.demo",
    "model.eval.cli",
    "shards.cli",
    "pipelines.engine.build_cli",
    "pipelines.sample_world.cli",
    "model.cli",
    "pipelines.audit.cli",
]


def _export_ply(sample: dict[str, Any], out: Path, data_root: Path | None = None) -> Any:
    """`gr3d shards show --ply`: the point-map corpus's exporter, imported only when used."""
    from pipelines.corpora.pointmaps.export import export_ply

    return export_ply(sample, out, data_root=data_root)


# Keyword arguments some `add_parser` take: what a lower package needs from above without importing it.
COMMAND_OPTIONS: dict[str, dict[str, Any]] = {"shards.cli": {"ply_exporter": _export_ply}}


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """ArgumentDefaultsHelpFormatter that leaves alone help which already says what the default is.

    Options whose default is computed at run time (`default=None`, "default: all CPUs") explain it in
    their own words; appending "(default: None)" there would be noise.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if "default" in help_text.lower() or action.default is argparse.SUPPRESS or action.required:
            return help_text
        if not action.option_strings and action.nargs not in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return help_text  # a required positional has no default
        return super()._get_help_string(action)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        # A generated table (lines starting "  --", e.g. `gr3d train`'s config keys) keeps its line breaks.
        if "\n  --" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def package_version() -> str:
    """The installed `gr3d` distribution's version, else pyproject's (a source checkout on PYTHONPATH)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gr3d")
    except PackageNotFoundError:
        import tomllib
        from pathlib import Path

        pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
        return str(tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["version"])


def iter_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """`parser` and every sub-parser below it (each once)."""
    out, todo, seen = [], [parser], set()
    while todo:
        p = todo.pop()
        if id(p) in seen:
            continue
        seen.add(id(p))
        out.append(p)
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                todo.extend(a.choices.values())
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gr3d",
        description="GR3D corpus engine: build the grounded-CoT, 3D-detection and point-map corpora, "
        "audit their annotation noise, train and evaluate GR3D.",
        epilog="Exit codes: 0 done, 1 a check found problems, 2 bad usage or a missing/unreadable input, "
        "130 interrupted.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}",
                        help="print the package version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub, **COMMAND_OPTIONS.get(name, {}))
    for p in iter_parsers(parser):
        p.formatter_class = DefaultsHelpFormatter
    return parser


def command_words(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """`eval det3d`, `build pointmap`, ...: the chosen (sub)command names, for one-line error messages."""
    dests = [a.dest for p in iter_parsers(parser) for a in p._actions if isinstance(a, argparse._SubParsersAction)]
    words: list[str] = []
    for d in dict.fromkeys(dests):
        v = getattr(args, d, None)
        if isinstance(v, str):
            words.append(v)
    return " ".join(words)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # what parse_args does, but a command may report it its own way (`usage_error`)
        getattr(args, "usage_error", parser.error)(f"unrecognized arguments: {' '.join(extra)}")
    from shards.interrupt import Interrupted

    try:
        return int(args.func(args) or 0)
    except Interrupted as exc:  # SIGINT / SIGTERM, after the command's clean-up: one line, 130 / 143
        print(f"gr3d {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        line = input_error_line(exc)
        if line is None:
            raise
        print(f"gr3d {command_words(parser, args)}: error: {line}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
