"""The exceptions the CLI turns into a one-line message and an exit code (docs/reliability.md)."""


class MmlabError(Exception):
    """A problem with the user's input: the message names the file and the fix. Exit code 2."""

    exit_code = 2


class TrainingDiverged(MmlabError):
    """Training produced a non-finite loss or weights, or an exploding loss (--diverge-factor); the last good
    checkpoint is kept. Exit code 3."""

    exit_code = 3
