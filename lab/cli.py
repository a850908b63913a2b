"""Shared plumbing of the entry points: user errors become one message and exit code 2."""
from __future__ import annotations

import functools
import hashlib
import sys
from pathlib import Path

from omegaconf import OmegaConf

from lab.errors import LabError, unwrap_instantiation
from tasks.protocol import TaskConfigError


# ``${first:a,b}``: the first value that is not null (used to put a resumed run's logs in its own
# directory instead of a new one).
OmegaConf.register_new_resolver("first", lambda *values: next((v for v in values if v is not None), None), replace=True)


def short_name(text: str, limit: int = 96) -> str:
    """A directory name from ``text``: unchanged when short, else truncated plus a hash of the whole."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"


# ``${short_name:...}`` keeps multirun job directories (named after their overrides) within
# file-name limits.
OmegaConf.register_new_resolver("short_name", short_name, replace=True)


def check_resume_argument(argv: list[str]) -> None:
    """Refuse ``resume=<path>`` pointing at no run before Hydra creates its run directory (which
    would otherwise leave a junk folder at the mistyped path, or a log inside an unrelated folder)."""
    for arg in argv[1:]:
        key, _, value = arg.partition("=")
        if key.lstrip("+") == "resume" and value not in ("", "null"):
            path = Path(value)
            if not path.is_dir():
                problem = "no such run directory"
            elif not (path / "config.yaml").is_file():
                problem = "this folder is not a run directory (it has no config.yaml)"
            else:
                continue
            print(f"error: resume={path}: {problem}; pass a folder train.py created, "
                  "e.g. resume=checkpoints/retrieval/<run>", file=sys.stderr)
            sys.exit(2)


# Hydra flags that take a value; ``--config-name`` and friends switch the config, so the lab's
# own check stands aside for them.
_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--experimental-rerun"}
_OTHER_CONFIG = {"--config-name", "-cn", "--config-path", "-cp", "--config-dir", "-cd"}


def command_line_overrides(argv: list[str]) -> list[str] | None:
    """The ``key=value`` overrides of a command line (None when it selects another config)."""
    overrides, skip = [], False
    for arg in argv[1:]:
        if skip:
            skip = False
        elif arg.split("=", 1)[0] in _OTHER_CONFIG:
            return None
        elif arg in _FLAGS_WITH_VALUE:
            skip = True
        elif not arg.startswith("-"):
            overrides.append(arg)
    return overrides


def check_command_line(config_name: str, argv: list[str]) -> None:
    """Check the command line's overrides before Hydra composes them (:mod:`lab.overrides`);
    a mistake is one ``error:`` line and exit code 2, with nothing written."""
    from lab.overrides import check_overrides

    overrides = command_line_overrides(argv)
    if overrides is None:
        return
    try:
        check_overrides(config_name, overrides)
    except LabError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def user_errors_exit(fn):
    """Run ``fn``; on a user error print ``error: <message>`` to stderr and exit with status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as error:  # noqa: BLE001
            cause = unwrap_instantiation(error)
            if isinstance(cause, (LabError, TaskConfigError)):
                print(f"error: {cause}", file=sys.stderr)
                sys.exit(2)
            raise

    return wrapper
