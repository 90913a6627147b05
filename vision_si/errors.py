"""Exceptions shared by every stage.

`InputError` marks a problem with what the user gave us (a file, a key, a value). The CLI turns it
into one line on stderr and exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input or configuration; the message names the file, key or value and what is allowed."""


class ConfigError(InputError):
    """A run configuration that cannot be used as written."""


class DataError(InputError):
    """A dataset, image or label file that cannot be used as written."""


class RunDirError(InputError):
    """A run directory that is missing, locked by another process or inconsistent."""


class EvaluationInvariantError(RuntimeError):
    """Synthetic data reached an evaluation split, or `test` was read too early. Stops the run."""
