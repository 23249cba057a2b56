"""One corpus, one frozen config dataclass: its fields are the builder's options, their CLI flags derived.

Each corpus (`det3d`, `pointmaps`, `cot`) declares its options once, as the fields of a frozen dataclass
(validated in `__post_init__`); a field's `option(...)` metadata says how `gr3d build CORPUS` spells it
(flag, help, argparse type/choices/metavar/action) and in which `--help` group it appears. From that:

- `add_options(parser, Config, groups)` adds the flags (field order = `--help` order; a field whose
  type is itself such a dataclass contributes its own fields at that place);
- `options_from_args(Config, args, **given)` builds the config from parsed arguments (`given` wins:
  values the corpus resolves itself, such as a sample world's files);
- the Python API takes the same object: `make_builder(Config(...))`.

Fields without `option(...)` metadata are Python-only (e.g. extra model keyword arguments for tests).
A flag that does not map one-to-one onto its field (`--omni3d-rule` -> a dict, `--no-cache`) names a
`from_args(args) -> value` converter, and `add(group)` adds its flags itself. No heavy imports here.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["CLI", "option", "add_options", "options_from_args"]

CLI = "gr3d_cli"  # the metadata key of a field's flag description


def option(default: Any = dataclasses.MISSING, *, help: str = "", group: str, flag: str | None = None,
           default_factory: Callable[[], Any] | None = None, from_args: Callable[[argparse.Namespace], Any] | None = None,
           add: Callable[[argparse._ActionsContainer], None] | None = None, cli_default: Any = dataclasses.MISSING,
           **argparse_kw: Any) -> Any:
    """A dataclass field that is also a `gr3d build` flag (see the module docstring).

    `argparse_kw` go to `add_argument` as they are (`type`, `choices`, `metavar`, `nargs`, `action`);
    `dest` is the field name unless given. `cli_default` is the flag's default where it differs from the
    field's (e.g. `[]` of an `extend` list whose field default is `()`).
    """
    if cli_default is not dataclasses.MISSING:
        argparse_kw["default"] = cli_default
    md = {CLI: {"help": help, "group": group, "flag": flag, "from_args": from_args, "add": add, "kw": argparse_kw}}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=md)
    return dataclasses.field(default=default, metadata=md)


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _nested(f: dataclasses.Field) -> type | None:
    """The dataclass type of a field that holds another options dataclass (declared by its default_factory)."""
    fac = f.default_factory  # type: ignore[misc]
    return fac if isinstance(fac, type) and dataclasses.is_dataclass(fac) else None


def add_options(parser: argparse.ArgumentParser, cls: type, groups: Mapping[str, str],
                _made: dict[str, argparse._ArgumentGroup] | None = None) -> None:
    """Add the flags of `cls`'s fields to `parser`, in field order, in argument groups titled by `groups`."""
    made = {} if _made is None else _made
    for f in dataclasses.fields(cls):
        sub = _nested(f)
        if sub is not None:
            add_options(parser, sub, groups, made)
            continue
        md = f.metadata.get(CLI)
        if md is None:
            continue
        g = made.get(md["group"])
        if g is None:
            g = made[md["group"]] = parser.add_argument_group(groups[md["group"]])
        if md["add"] is not None:
            md["add"](g)
            continue
        kw = {"dest": f.name, **md["kw"]}
        kw.setdefault("default", _default_of(f))
        g.add_argument(md["flag"] or "--" + f.name.replace("_", "-"), help=md["help"], **kw)


def options_from_args(cls: type, args: argparse.Namespace, **given: Any) -> Any:
    """An instance of `cls` from parsed `gr3d build` arguments; keyword arguments override (see module doc)."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in given:
            values[f.name] = given[f.name]
            continue
        sub = _nested(f)
        if sub is not None:
            values[f.name] = options_from_args(sub, args)
            continue
        md = f.metadata.get(CLI)
        if md is None:
            continue
        values[f.name] = md["from_args"](args) if md["from_args"] is not None else getattr(args, f.name)
    return cls(**values)
