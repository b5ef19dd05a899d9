"""Read the next inputs in a background thread while the model works on the current one
(shared by `segment` and `eval`)."""
from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor


def prefetched(load, items, ahead: int):
    """load(item) for each item, in order, computed in one background thread up to `ahead` items
    early; an exception load raised is raised when its item is reached."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = deque(pool.submit(load, it) for it in items[:ahead])
        for it in items[ahead:]:
            pending.append(pool.submit(load, it))
            yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
