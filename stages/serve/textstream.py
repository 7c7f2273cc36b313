"""Incremental detokenization with stop strings, so streamed deltas add up to the final text.

Decoding token by token breaks multi-byte characters (byte-fallback pieces decode to U+FFFD
until the character is complete) and could emit the start of a stop string that later
completes. `TextStream` decodes the whole span each time and only releases text that can no
longer change: trailing U+FFFD and any suffix that is a prefix of a stop string are held back.
"""

from __future__ import annotations

from glm.tokenizer import GLMTokenizer

REPLACEMENT = "\ufffd"


class TextStream:
    """Text of one generated span, released as deltas; `stopped` once a stop string appeared."""

    def __init__(self, tokenizer: GLMTokenizer, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.tokens: list[int] = []
        self.emitted = ""
        self.stopped = False
        self._final: str | None = None

    def add(self, token: int) -> str:
        """Append a generated token; returns the text that is now safe to emit ('' if none)."""
        self.tokens.append(token)
        full = self.tokenizer.decode(self.tokens)
        cut = self._stop_index(full)
        if cut is not None:
            self.stopped = True
            self._final = full[:cut]
            return self._release(self._final)
        end = len(full)
        while end > len(self.emitted) and full[end - 1] == REPLACEMENT:
            end -= 1  # an incomplete UTF-8 character: wait for its other bytes
        end -= self._held_stop_prefix(full[:end])
        return self._release(full[:end])

    def finish(self) -> str:
        """The rest of the text at the end of generation (everything not yet emitted)."""
        if self._final is None:
            self._final = self.tokenizer.decode(self.tokens)
        return self._release(self._final)

    @property
    def text(self) -> str:
        """The final text (valid after `finish` or a stop)."""
        return self._final if self._final is not None else self.tokenizer.decode(self.tokens)

    def _release(self, upto: str) -> str:
        if len(upto) <= len(self.emitted):
            return ""
        delta = upto[len(self.emitted):]
        self.emitted = upto
        return delta

    def _stop_index(self, full: str) -> int | None:
        # A stop string can only newly appear in text not yet emitted (plus its own length).
        start = max(0, len(self.emitted) - max((len(s) for s in self.stop), default=0))
        hits = [i for i in (full.find(s, start) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _held_stop_prefix(self, text: str) -> int:
        """Length of the longest suffix of `text` that begins some stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
