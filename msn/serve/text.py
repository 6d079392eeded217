"""Token ids in, text out, one token at a time: what a stream may send now without ever taking it back.

Two things make naive per-token decoding wrong. A character can span several tokens (byte-level BPE splits
UTF-8), so a token may decode to half a character: we hold text back while it ends in U+FFFD. And a stop
string may arrive over several tokens: text that could still be the start of a stop string is held back
until it either completes one (the text is cut just before it) or cannot anymore. Streaming and
non-streaming responses both use this class, so they carry the same text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

_INCOMPLETE = "\ufffd"  # what a decoder makes of an unfinished UTF-8 sequence


class TextStream:
    """Incremental detokenisation with exact stop strings.

    ``decode`` maps token ids to text (special tokens skipped). Tokens are decoded in a window that starts
    one token back (``prefix``..``read``, as vLLM and TGI do), so per-token text equals the whole decode
    also for tokenizers that strip or merge spaces at the start of a decode.
    """

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str] = ()):
        self.decode = decode
        self.stops = [s for s in stops if s]
        self.tokens: list[int] = []
        self.prefix = self.read = 0  # token offsets of the decode window
        self.text = ""  # everything decoded so far (append-only)
        self.sent = 0  # characters of ``text`` handed out
        self.stopped = False  # a stop string was found: nothing more will be handed out

    def push(self, token: int) -> str:
        """Add one token; return the text that is now safe to send (possibly "")."""
        if self.stopped:
            return ""
        self.tokens.append(int(token))
        self.text += self._decoded()
        return self._release(final=False)

    def finish(self) -> str:
        """Generation ended without a stop string: the held-back rest (incomplete bytes included)."""
        if self.stopped:
            return ""
        before = self.decode(self.tokens[self.prefix : self.read])
        rest = self.decode(self.tokens[self.prefix :])
        if len(rest) > len(before):
            self.text += rest[len(before) :]
            self.prefix = self.read = len(self.tokens)
        return self._release(final=True)

    @property
    def sent_text(self) -> str:
        return self.text[: self.sent]

    def _decoded(self) -> str:
        before = self.decode(self.tokens[self.prefix : self.read])
        now = self.decode(self.tokens[self.prefix :])
        if len(now) <= len(before) or now.endswith(_INCOMPLETE):
            return ""  # nothing new yet, or half a character: wait for the next token
        self.prefix, self.read = self.read, len(self.tokens)
        return now[len(before) :]

    def _release(self, final: bool) -> str:
        end = len(self.text)
        if self.stops:
            # A stop can only start where the previous release left no held-back text, so search from there.
            start = max(0, self.sent - max(len(s) for s in self.stops) + 1)
            hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
            if hits:
                end, self.stopped = min(hits), True
            elif not final:
                end -= self._held_back()
        out = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return out

    def _held_back(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of some stop string."""
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:n]):
                    longest = n
                    break
        return longest
