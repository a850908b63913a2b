"""User-facing errors: shown as one clear message, never a traceback."""
from __future__ import annotations


class LabError(Exception):
    """A problem with the user's input (config, run directory, checkpoint) and how to fix it."""


def unwrap_instantiation(error: Exception) -> Exception:
    """Hydra wraps constructor errors; return the user's real error if there is one."""
    from hydra.errors import InstantiationException

    while isinstance(error, InstantiationException) and error.__cause__ is not None:
        error = error.__cause__
    return error
