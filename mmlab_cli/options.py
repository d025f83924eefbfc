"""Options declared once: a dataclass field with its help, choices and flag beside it (`option`), and the
Typer flags generated from such a dataclass (`flags`). `mmlab train` gets its flags from TrainConfig
(mmlab_cli/config.py), each analysis command from its Settings dataclass and the shared `RunOptions`
(mmlab_cli/analysis/settings.py). A field declared without `option` is not a flag (an internal setting).

Every flag's default is None (not given), so a flag overrides a dataclass default only when it is given;
the help text shows the dataclass default. Two ways values arrive: as text (`as_text=True`, train: recipes
and key=value overrides convert and validate them in config.resolve_config), or typed (analyses: click
converts int/float/str/bool, and a field with `parse` gets its text through that function, e.g. '0:0.3:0.05'
into a list of radii). `from_flags` builds the dataclass from the given flags; `parse_args` parses a list of
command-line arguments with such flags (the sweep file's analysis arguments).

The training methods declare their options with `option` too (mmlab_cli/methods/registry.py), with bounds
(`at_least`, `above`) that the config's validation checks and a `kind` where the type is not the default's.

Lowest layer: imports nothing of mmlab (typer lazily, when flags are built)."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Optional

METAVARS = {"int": "INT", "float": "FLOAT", "str": "TEXT"}
TYPES = {"int": int, "float": float, "str": str}
KINDS = {bool: "bool", int: "int", float: "float", str: "str"}


def option(default, help: str, choices: tuple = (), metavar: str = "", *, flag: str = "", parse=None,
           shown: str | None = None, kind: str = "", at_least: float | None = None, above: float | None = None):
    """A dataclass field with what `--help` says about it: the one declaration of an option (its flag, help,
    default and choices are generated from it). `flag`: the flag's declaration when it is not --<field-name>
    (e.g. '--metric', '--fgap-relative/--fgap-absolute', or
    several names: '--scheduler --schedule'); `parse(text)`: the value of the flag's text (the
    flag then takes text); `shown`: the default as the help shows it; `kind`: the field's type as text
    ("list[float]", ...), from the default when it is a plain value; `at_least` (>=) and `above` (>): bounds the
    config's validation checks. Lists and dicts get a fresh copy of `default` per instance."""
    meta = {"help": help, "choices": tuple(choices), "metavar": metavar, "flag": flag, "parse": parse,
            "shown": shown, "kind": kind or KINDS.get(type(default), ""), "at_least": at_least, "above": above}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def default_of(f: dataclasses.Field):
    """The default value of an option (a fresh copy for a list or a dict)."""
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def declared(cls) -> list[dataclasses.Field]:
    """The fields of `cls` declared with `option` (its flags), in order."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def _default_text(f: dataclasses.Field) -> str:
    if f.metadata["shown"] is not None:
        return f" [default: {f.metadata['shown']}]"
    default = default_of(f)
    shown = ",".join(map(str, default)) if isinstance(default, list) else default
    return f" [default: {shown}]" if shown not in ("", {}, None) else ""


def flag(f: dataclasses.Field, as_text: bool = True) -> inspect.Parameter:
    """The Typer option of one field (None = not given): text when `as_text` or the field has `parse`, else
    the field's own scalar type; bools are --x/--no-x switches unless `flag` declares others."""
    import typer

    meta = f.metadata
    decl = meta["flag"] or f"--{f.name.replace('_', '-')}"
    base = f.type.replace(" | None", "")
    if base == "bool":
        decls = decl if meta["flag"] else f"{decl}/--no-{decl[2:]}"
        shown = "" if default_of(f) is None else f" [default: {'on' if default_of(f) else 'off'}]"
        opt = typer.Option(None, decls, show_default=False, help=meta["help"] + shown)
        return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=Optional[bool])
    typed = TYPES.get(base) if not as_text and meta["parse"] is None else None
    metavar = "|".join(meta["choices"]) or meta["metavar"] or METAVARS.get(base, "TEXT")
    opt = typer.Option(None, *decl.split(), help=meta["help"] + _default_text(f), metavar=metavar, show_default=False)
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=opt,
                             annotation=Optional[typed or str])


def argument(name: str, annotation, help: str) -> inspect.Parameter:
    """A required positional argument of a command whose options are generated (e.g. the run directories)."""
    import typer

    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                             default=typer.Argument(..., help=help))


def flags(*classes, as_text: bool = False) -> list[inspect.Parameter]:
    """The Typer options of every declared field of `classes`, in order."""
    return [flag(f, as_text) for cls in classes for f in declared(cls)]


def from_flags(cls, given: dict):
    """An instance of `cls` from the flags given (None: not given, the dataclass default); a field's `parse`
    turns its text into the value."""
    values = {}
    for f in declared(cls):
        value = given.get(f.name)
        if value is not None:
            values[f.name] = f.metadata["parse"](value) if f.metadata["parse"] else value
    return cls(**values)


def with_signature(fn, parameters: list[inspect.Parameter]):
    """`fn` with this signature, as Typer reads it: its flags generated from declarations."""
    fn.__signature__ = inspect.Signature(parameters)
    fn.__annotations__ = {p.name: p.annotation for p in parameters}
    return fn


def parse_args(parameters: list[inspect.Parameter], name: str, args: list[str]) -> dict:
    """The values a command with these parameters (e.g. generated `flags`) reads from `args`, as click parses
    them (None: not given); a usage error raises click's UsageError (as typer ships click, a typer.TyperException)."""
    import typer

    def command(**given) -> None:
        """Parses only."""

    app = typer.Typer(rich_markup_mode=None)
    app.command(name)(with_signature(command, parameters))
    return typer.main.get_command(app).make_context(name, list(args)).params
