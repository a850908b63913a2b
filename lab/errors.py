"""User-facing errors: shown as one clear message, never a traceback."""
from __future__ import annotations


class LabError(Exception):
    """A problem with the user's input (config, run directory, checkpoint) and how to fix it."""
