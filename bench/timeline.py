"""The engine loop's steps in time order, for a benchmark that wants to see how a burst of prompts
went through it: for each of the first `limit` steps launched, when its launch began and ended, when
its completion began and ended (milliseconds from the first launch), and how many prompt pieces and
decode rows it held. Wraps the loop's two stages on one engine; nothing else changes."""

from __future__ import annotations

import time


class StepTimeline:
    def __init__(self, loop, limit: int = 16):
        self.loop, self.limit, self.steps, self._t0, self._rows = loop, limit, [], None, {}
        self._launch, self._complete = loop._launch, loop._complete
        loop._launch, loop._complete = self._timed_launch, self._timed_complete

    def _ms(self) -> float:
        now = time.perf_counter()
        self._t0 = now if self._t0 is None else self._t0
        return round(1e3 * (now - self._t0), 2)

    def _timed_launch(self, plan):
        start = self._ms()
        handle = self._launch(plan)
        if handle is not None and len(self.steps) < self.limit:
            row = {"launch": [start, self._ms()], "prompts": len(plan.prefill), "decode": len(plan.decode)}
            self.steps.append(row)
            self._rows[id(handle)] = row
        return handle

    def _timed_complete(self, step):
        start = self._ms()
        self._complete(step)
        row = self._rows.pop(id(step), None)
        if row is not None:
            row["complete"] = [start, self._ms()]

    def detach(self) -> list[dict]:
        self.loop._launch, self.loop._complete = self._launch, self._complete
        return self.steps
