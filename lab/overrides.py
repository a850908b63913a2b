"""Command-line overrides checked before Hydra runs, so every mistake is one ``error:`` line.

Hydra's own messages for a mistyped group option, key or value are long and sometimes wrong for
this lab (it suggests ``+key=value``, which then adds an unused key silently). :func:`check_overrides`
composes the config the way Hydra will and refuses, naming the problem and the fix:

- an unknown group option (``task=retrievl``, ``evaluators=[nope]``): the available options;
- an unknown key, with or without ``+`` (``train.foo=1``, ``+render.canvas=16``): the close keys.
  ``+`` may add a key only where the section is passed to a callable that accepts it (a
  ``_target_`` section, or ``trainer``: Lightning's ``Trainer``);
- a value of the wrong type (``train.lr=abc``): the key, the expected type and the default.

The YAML files are the schema: a key's type is the type of its composed default.
"""
from __future__ import annotations

import difflib
import importlib
import inspect
from pathlib import Path
from typing import Any, Iterable

from omegaconf import DictConfig, ListConfig, OmegaConf

from lab.errors import LabError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

# Sections handed to a callable as keyword arguments without a ``_target_`` of their own.
KWARG_SECTIONS = {"trainer": "lightning.Trainer"}


def check_overrides(config_name: str, overrides: Iterable[str], conf_dir: Path = CONF_DIR) -> None:
    """Raise :class:`LabError` for the first override that Hydra would reject or silently misuse."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as error:
        raise LabError(f"cannot read the command line: {_first_line(error)}") from None
    parsed = [o for o in parsed if not o.key_or_group.startswith("hydra") and not o.is_sweep_override()]
    groups = [o for o in parsed if _is_group(conf_dir, o.key_or_group)]
    values = [o for o in parsed if o not in groups]
    for override in groups:
        _check_group_option(conf_dir, override)
    base = _compose(config_name, [o.input_line for o in groups], conf_dir)
    for override in values:
        _check_value(base, override)
    _compose(config_name, [o.input_line for o in parsed], conf_dir)  # anything left that Hydra refuses


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _group_name(key: str) -> str:
    return key.split("@", 1)[0]


def _is_group(conf_dir: Path, key: str) -> bool:
    return (conf_dir / _group_name(key)).is_dir()


def group_options(conf_dir: Path, group: str) -> list[str]:
    """The options of a config group: its ``.yaml`` files, without private ``_base``-style ones."""
    return sorted(p.stem for p in (conf_dir / group).glob("*.yaml") if not p.stem.startswith("_"))


def _check_group_option(conf_dir: Path, override) -> None:
    if override.is_delete():
        return
    group = _group_name(override.key_or_group)
    value = override.value()
    chosen = list(value) if isinstance(value, (list, tuple)) else [value]
    options = group_options(conf_dir, group)
    for option in chosen:
        if option is None or str(option) == "null":
            continue
        if not (conf_dir / group / f"{option}.yaml").is_file():
            close = difflib.get_close_matches(str(option), options, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise LabError(f"unknown {group} {option!r}{hint}; choose one of: {', '.join(options)}")


def _compose(config_name: str, overrides: list[str], conf_dir: Path) -> DictConfig:
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            return compose(config_name=config_name, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as error:
        raise LabError(f"the config does not compose: {_first_line(error)}") from None


_MISSING = object()


def _select(cfg: DictConfig, key: str) -> Any:
    """The node or value at ``key`` (interpolations resolved where they can be), or ``_MISSING``."""
    node: Any = cfg
    for part in key.split("."):
        if isinstance(node, DictConfig) and part in node:
            try:
                node = node[part]
            except Exception:  # noqa: BLE001 - an interpolation only Hydra's runtime resolves
                return None
        elif isinstance(node, ListConfig) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return _MISSING
    return node


def _check_value(base: DictConfig, override) -> None:
    key = override.key_or_group
    current = _select(base, key)
    if override.is_delete():
        if current is _MISSING:
            raise LabError(f"~{key}: there is no such key to delete{_close_keys(base, key)}")
        return
    if current is _MISSING:
        if override.is_add() or override.is_force_add():
            if _accepts_new_key(base, key):
                return
            raise LabError(
                f"+{key}: the lab has no setting {key!r}, so adding it would change nothing{_close_keys(base, key)}"
            )
        raise LabError(f"unknown key {key!r}{_close_keys(base, key)}")
    _check_type(key, current, override.value())


def _all_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    if isinstance(node, DictConfig):
        for name in node.keys():
            path = f"{prefix}{name}"
            keys.append(path)
            child = node._get_node(name)
            if isinstance(child, DictConfig):
                keys += _all_keys(child, f"{path}.")
    return keys


def _close_keys(base: DictConfig, key: str) -> str:
    keys = [k for k in _all_keys(base) if not k.startswith("hydra")]
    leaf = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    close += [k for k in keys if k.rsplit(".", 1)[-1] == leaf and k not in close]
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    siblings = _select(base, parent) if parent else base
    if not close and isinstance(siblings, DictConfig):
        close = [f"{parent}.{k}" if parent else str(k) for k in difflib.get_close_matches(leaf, [str(k) for k in siblings.keys()], n=3, cutoff=0.5)]
    return f"; close keys: {', '.join(close[:4])}" if close else f"; see `python {_entry_point(base)} --cfg job` for every key"


def _entry_point(base: DictConfig) -> str:
    return "train.py" if "train" in base else "evaluate.py"


def _accepts_new_key(base: DictConfig, key: str) -> bool:
    """True when ``key``'s nearest section is passed to a callable that takes ``key``'s last part."""
    parts = key.split(".")
    for depth in range(len(parts) - 1, 0, -1):
        section = _select(base, ".".join(parts[:depth]))
        target = None
        if isinstance(section, DictConfig) and "_target_" in section:
            target = section["_target_"]
        elif depth == 1 and parts[0] in KWARG_SECTIONS:
            target = KWARG_SECTIONS[parts[0]]
        if target is not None:
            return depth == len(parts) - 1 and _takes_keyword(str(target), parts[-1])
    return False


def _takes_keyword(target: str, name: str) -> bool:
    module, _, attr = target.rpartition(".")
    try:
        signature = inspect.signature(getattr(importlib.import_module(module), attr))
    except (ImportError, AttributeError, ValueError, TypeError):
        return False
    return name in signature.parameters


def _type_name(value: Any) -> str:
    return {bool: "a boolean (true/false)", int: "an integer", float: "a number", str: "a string"}.get(type(value), type(value).__name__)


def _check_type(key: str, current: Any, given: Any) -> None:
    """Refuse a value whose type cannot stand for the default's (null is always accepted)."""
    if given is None or current is None or isinstance(current, (DictConfig, ListConfig)) and isinstance(given, (dict, list)):
        return
    if isinstance(current, DictConfig):
        raise LabError(f"{key} is a section, not a value; set one of its keys ({', '.join(map(str, current.keys()))})")
    if isinstance(current, ListConfig):
        raise LabError(f"{key} expects a list such as [{', '.join(map(str, current))}], got {given!r}")
    if isinstance(current, bool):
        ok = isinstance(given, bool)
    elif isinstance(current, int):
        ok = isinstance(given, int) and not isinstance(given, bool)
    elif isinstance(current, float):
        ok = isinstance(given, (int, float)) and not isinstance(given, bool)
    else:
        ok = not isinstance(given, (dict, list))
    if not ok:
        raise LabError(f"{key}={given!r}: expected {_type_name(current)} (default {current!r})")
