"""Server-sent events: turn response lines into ``data`` payloads (the WHATWG event-stream rules we need)."""

from __future__ import annotations

DONE = "[DONE]"


class SSEDecoder:
    """Feed lines (without their line ending); get each event's data when its blank line arrives.

    ``data:`` lines of one event are joined with newlines; comments (``: ping``), ``event:``, ``id:`` and
    ``retry:`` lines are ignored. Call :meth:`flush` at end of stream for an event left unterminated.
    """

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        line = line.rstrip("\r\n")
        if not line:
            return self.flush()
        if line.startswith(":"):
            return None
        field, _, value = line.partition(":")
        if field == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None

    def flush(self) -> str | None:
        if not self._data:
            return None
        data, self._data = "\n".join(self._data), []
        return data
