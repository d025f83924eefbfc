"""The one registry shape for everything chosen by name (methods, encoders, fusions, loggers): a read-only
mapping filled by `register`, whose `pick(name)` is the entry or one line listing the choices.

It sits in the lowest layer beside errors.py and imports nothing heavy, so that a torch-free registry (the
methods' declarations, the fusion kinds, the loggers) can be read by the config and by `mmlab --help`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from mmlab_cli.errors import MmlabError


class Registry(Mapping):
    """name -> entry in registration order. `@REG.register("name")` on a function or class, or
    `REG.register("name", entry)` for a value; a name registered twice is a programming error."""

    def __init__(self, what: str):
        self.what = what  # 'encoder', 'fusion', ...: the noun of the error message
        self._entries: dict[str, object] = {}

    def register(self, name: str, entry=None):
        if name in self._entries:
            raise ValueError(f"{self.what} '{name}' is registered twice")
        if entry is not None:
            self._entries[name] = entry
            return entry

        def add(obj):
            self._entries[name] = obj
            return obj

        return add

    def pick(self, name: str):
        """The entry registered as `name`, or one line naming the choices."""
        if name not in self._entries:
            raise MmlabError(f"unknown {self.what} '{name}'; choose one of {', '.join(self._entries)}")
        return self._entries[name]

    def __getitem__(self, name: str):
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
