"""`option(...)`: the one declaration of a training option (its default, the help `mmlab train --help` shows,
choices, bounds), shared by the config's own options and those each training method declares
(mmlab_cli/methods/registry.py). Torch-free, in the lowest layer."""

from __future__ import annotations

from dataclasses import MISSING, field

KINDS = {bool: "bool", int: "int", float: "float", str: "str"}


def option(default, help: str, choices: tuple = (), metavar: str = "", *, kind: str = "",
           at_least: float | None = None, above: float | None = None):
    """A TrainConfig field with what `mmlab train --help` says about it: the flag, its help, default and
    choices are generated from it, and the config's validation checks its bounds (`at_least`: >=, `above`: >).
    `kind` is the field's type as text ("list[float]", ...), from the default when it is a plain value.
    Lists and dicts get a fresh copy of `default` per config."""
    meta = {"help": help, "choices": tuple(choices), "metavar": metavar, "kind": kind or KINDS.get(type(default), ""),
            "at_least": at_least, "above": above}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def default_of(f):
    """The default value of an option (a fresh copy for a list or a dict)."""
    return f.default_factory() if f.default is MISSING else f.default
