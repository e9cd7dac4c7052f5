"""Which controller may act: the store's leadership (flock / etcd lease), checked before every write."""

from __future__ import annotations

import structlog

from grayagent.errors import GrayagentError
from grayagent.stores.base import Leadership, RolloutState

log = structlog.get_logger("grayagent.rollout")


class LeadershipLost(GrayagentError):
    """This controller may no longer lead: it must neither publish nor write a record."""


class Leader:
    """Holds (or tries to take) the store's rollout leadership for one holder name."""

    def __init__(self, state: RolloutState, holder: str, store_url: str) -> None:
        self.state = state
        self.holder = holder
        self.store_url = store_url
        self.leadership: Leadership | None = None

    def lead(self) -> bool:
        """Keep or take the leadership; False while another controller leads (or the store cannot tell)."""
        if self.leadership is not None and not self.leadership.held():
            log.warning("rollout leadership lost", holder=self.holder)
            self.leadership.release()
            self.leadership = None
        if self.leadership is None:
            try:
                self.leadership = self.state.acquire_leadership(self.holder)
            except GrayagentError as exc:
                log.warning("leader election failed", error=str(exc))
                return False
            if self.leadership is not None:
                log.info("leading rollouts", holder=self.holder, store=self.store_url)
        return self.leadership is not None

    def leading(self) -> bool:
        return self.leadership is None or self.leadership.held()

    def guard(self) -> None:
        """Called immediately before every publish and record write."""
        if not self.leading():
            raise LeadershipLost("rollout leadership lost")

    def release(self) -> None:
        if self.leadership is not None:
            self.leadership.release()
            self.leadership = None
