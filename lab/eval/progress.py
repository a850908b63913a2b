"""A progress display for evaluators: a tqdm bar on a terminal, one log line per step otherwise
(so a long evaluation in a log file or under nohup still shows how far it is)."""
from __future__ import annotations

import logging
import sys
import time
from typing import Callable, Iterable

log = logging.getLogger("lab.eval")


def progress(items: Iterable, desc: str, describe: Callable | None = None):
    """Yield ``items`` while showing how far along they are; ``describe(item)`` names an item in
    the log lines (default: its position only)."""
    items = list(items)
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        yield from tqdm(items, desc=desc, leave=False, dynamic_ncols=True)
        return
    start = time.perf_counter()
    for i, item in enumerate(items):
        what = f" {describe(item)}" if describe is not None else ""
        log.info("%s:%s (%d/%d, %.0f s so far)", desc, what, i + 1, len(items), time.perf_counter() - start)
        yield item
