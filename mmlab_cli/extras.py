"""Optional features and the pip extra that brings each one: a missing extra is a one-line error."""

from __future__ import annotations

import importlib
from types import ModuleType

from mmlab_cli.errors import MmlabError


def require(module: str, extra: str, feature: str) -> ModuleType:
    """Import `module`, or fail with one line naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MmlabError(f"{feature} needs the '{module}' package: pip install 'mmlab[{extra}]'") from None
