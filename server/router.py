"""Execution-mode policy: which adapter (if any) is merged into the weights, and who may be admitted.

- batched: nothing is ever merged; every row carries its adapter's side path.
- merged: adapters take turns. The adapter of the oldest waiting request is merged once the batch
  is empty; only its requests are admitted while it is merged. A turn stops admitting once another
  request has waited `max_turn_s` (the fairness bound), drains, and the next turn starts.
- auto: admission is first come, first served; after admission, the adapter holding at least
  `merge_share` of the running rows (and `min_rows` of them) is merged, and stays merged while it
  holds `unmerge_share`. Rows of other adapters run beside it in the same forward (hybrid): they add
  their own delta and subtract the merged one's. A wide mix runs batched (nothing merged).
Keys are adapter identities (`Sequence.adapter_key`); None is the base model.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from server.engine_types import Mode


@dataclass
class RouterConfig:
    mode: Mode = "auto"
    merge_share: float = 0.75
    unmerge_share: float = 0.5
    min_rows: int = 4
    max_turn_s: float = 2.0


class Router:
    def __init__(self, config: RouterConfig):
        self.config = config
        self.turn: str | None = None  # merged mode: the adapter whose turn it is
        self.turn_open = True  # merged mode: the turn still admits its requests

    @property
    def mode(self) -> Mode:
        return self.config.mode

    def set_mode(self, mode: Mode) -> None:
        self.config.mode = mode
        self.turn_open = True

    def begin_step(self, running: Iterable[str | None], waiting: list[tuple[str | None, float]], now: float) -> None:
        """Merged-mode turn keeping. waiting: (key, arrival time), oldest first."""
        if self.mode != "merged" or not waiting:
            return
        if not any(True for _ in running):
            if not self.turn_open:  # the fairness bound closed the turn: the oldest other adapter is next
                self.turn = next((k for k, _ in waiting if k != self.turn), waiting[0][0])
            elif all(k != self.turn for k, _ in waiting):
                self.turn = waiting[0][0]
            self.turn_open = True
            return
        oldest_other = next((t for k, t in waiting if k != self.turn), None)
        if oldest_other is not None and now - oldest_other >= self.config.max_turn_s:
            self.turn_open = False

    def may_admit(self, key: str | None) -> bool:
        return self.mode != "merged" or (key == self.turn and self.turn_open)

    def merged_key(self, running: list[str | None], current: str | None) -> str | None:
        """The adapter to hold merged during the next step."""
        if self.mode == "batched":
            return None
        if self.mode == "merged":
            return self.turn if all(k == self.turn for k in running) else current
        counts = Counter(k for k in running if k is not None)
        n = len(running)
        if not counts or n == 0:
            return current if current is not None and not running else None
        if current is not None and counts.get(current, 0) / n >= self.config.unmerge_share:
            return current
        best, count = counts.most_common(1)[0]
        if count >= self.config.min_rows and count / n >= self.config.merge_share:
            return best
        return None
