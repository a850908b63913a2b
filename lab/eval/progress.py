"""A progress display for evaluators: a tqdm bar on a terminal, one log line per step otherwise
(so a long evaluation in a log file or under nohup still shows how far it is)."""
from __future__ import annotations

import logging
import sys
import time
from typing import Iterable

log = logging.getLogger("lab.eval")


def progress(items: Iterable, desc: str, total: int | None = None):
    """Yield ``items`` while showing how far along they are."""
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        yield from tqdm(items, desc=desc, total=total, leave=False, dynamic_ncols=True)
        return
    items = list(items)
    start = time.perf_counter()
    for i, item in enumerate(items):
        log.info("%s: %d/%d (%.0f s so far)", desc, i + 1, len(items), time.perf_counter() - start)
        yield item
