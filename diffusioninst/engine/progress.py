"""Progress lines for long-running loops (readable in ``ray job logs``)."""

from __future__ import annotations

import datetime
import sys
import time
from collections.abc import Mapping


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return str(datetime.timedelta(seconds=seconds))


class Progress:
    """Tracks throughput over a sliding window since the last line and prints one line per call.

    Args:
        total: the final iteration number.
        start: the iteration the loop starts at (after a resume).
        prefix: text at the start of every line.
    """

    def __init__(self, total: int, start: int = 0, prefix: str = "train", stream=None) -> None:
        self.total = total
        self.start = start
        self.prefix = prefix
        self.stream = stream or sys.stdout
        self.t0 = time.perf_counter()
        self.last_t = self.t0
        self.last_it = start
        self.images = 0

    def add_images(self, n: int) -> None:
        self.images += n

    def line(
        self, iteration: int, values: Mapping[str, float], lr: float | None = None, remaining_s: float | None = None
    ) -> dict[str, float]:
        """Print ``[train] iter 120/1000 | eta 0:05:12 | 3.9 img/s | lr 1.0e-03 | loss 12.3 | loss_ce ...``.

        ``remaining_s``: time left in a time budget; the ETA is the sooner of it and the iteration-based one.
        Returns the throughput figures (img/s, s/iter) for logging.
        """
        now = time.perf_counter()
        dt = max(now - self.last_t, 1e-9)
        done = iteration - self.last_it
        img_s = self.images / dt
        sec_per_it = dt / max(done, 1)
        elapsed = now - self.t0
        rate = elapsed / max(iteration - self.start, 1)
        eta = rate * (self.total - iteration)
        if remaining_s is not None:
            eta = min(eta, remaining_s)
        parts = [f"[{self.prefix}] iter {iteration}/{self.total}", f"eta {format_duration(eta)}", f"{img_s:.2f} img/s"]
        if lr is not None:
            parts.append(f"lr {lr:.3g}")
        parts += [f"{k} {v:.4g}" for k, v in values.items()]
        print(" | ".join(parts), file=self.stream, flush=True)
        self.last_t, self.last_it, self.images = now, iteration, 0
        return {"img_per_s": img_s, "sec_per_iter": sec_per_it, "eta_s": eta}
