"""Stop strings, matched on decoded text across token boundaries, without ever showing a stop that is then cut.

Text arrives in deltas (whole characters, from the detokenizer). The matcher releases text up to the point where
a stop string could still begin: the longest suffix that is a prefix of some stop string is held back until the
next delta decides it. When a stop string appears, the text before it (plus the stop itself with
`include_stop_str_in_output`) is released and the sequence ends. The earliest match wins; at equal positions the
longest stop string. So streamed deltas and the unary content are the same text by construction.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StopMatcher:
    """Feed text deltas with `push`; read `released` text and whether a stop was hit."""

    stops: tuple[str, ...]
    include_stop: bool = False
    pending: str = ""
    stopped: bool = False

    def push(self, delta: str, *, can_stop: bool = True) -> str:
        """Add decoded text; return what may be shown now. `can_stop` False (before min_tokens) only releases."""
        if self.stopped:
            return ""
        text = self.pending + delta
        if not self.stops:
            self.pending = ""
            return text
        if can_stop:
            hit = self._first_match(text)
            if hit is not None:
                start, stop = hit
                self.stopped = True
                self.pending = ""
                return text[: start + (len(stop) if self.include_stop else 0)]
        hold = self._held_suffix(text) if can_stop else 0
        self.pending = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold]

    def flush(self) -> str:
        """The sequence ended otherwise (EOS, length): whatever was held back is plain text after all."""
        text, self.pending = self.pending, ""
        return "" if self.stopped else text

    def _first_match(self, text: str) -> tuple[int, str] | None:
        best: tuple[int, str] | None = None
        for stop in self.stops:
            i = text.find(stop)
            if i >= 0 and (best is None or i < best[0] or (i == best[0] and len(stop) > len(best[1]))):
                best = (i, stop)
        return best

    def _held_suffix(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        longest = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:k]):
                    longest = k
                    break
        return longest
