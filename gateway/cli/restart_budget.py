"""How many times one crashed service may be restarted: at most `limit` restarts within any `window_s` seconds
(systemd's StartLimitBurst within StartLimitIntervalSec), so a crash loop stops the stack while crashes days
apart never use the budget up.

The wait before a restart doubles with each restart still inside the window. A service that stayed up longer
than the window has no restart left inside it (each restart happened before its last start), so the backoff is
back at its base after a healthy period. Pure bookkeeping on times the caller passes in: no clock, no sleep.
"""
from __future__ import annotations

from collections import deque


class RestartBudget:
    def __init__(self, limit: int, window_s: float, backoff_s: float) -> None:
        self.limit = limit
        self.window_s = window_s
        self.backoff_s = backoff_s
        self._restarts: deque[float] = deque()   # times of the restarts inside the window, oldest first

    def recent(self, now: float) -> int:
        """Restarts within the last window_s seconds before `now`."""
        while self._restarts and self._restarts[0] <= now - self.window_s:
            self._restarts.popleft()
        return len(self._restarts)

    def take(self, now: float) -> float | None:
        """A crash at `now`: the seconds to wait before restarting (the restart is counted), or None when the
        window already holds `limit` restarts and the service must stay down."""
        done = self.recent(now)
        if done >= self.limit:
            return None
        self._restarts.append(now)
        return self.backoff_s * 2 ** done
