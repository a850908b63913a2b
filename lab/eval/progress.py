"""A progress display for evaluators: tqdm on a terminal, silent in logs and tests."""
from __future__ import annotations

from typing import Iterable


def progress(items: Iterable, desc: str, total: int | None = None):
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, total=total, leave=False, disable=None, dynamic_ncols=True)

