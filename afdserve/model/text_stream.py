"""One request's output text as it streams: detokenized incrementally, cut at stop strings.

Stop strings are matched on the text, not on tokens (a stop string may span tokens or end in
the middle of one), which is why the fronts (the server's streams, `LLM.generate`), not the
scheduler, apply them. As in vLLM
and OpenAI, the text ends just before the earliest stop string and the stop string itself is
not returned. While streaming, a tail of the text that could still grow into a stop string is
held back until it either does (and is dropped) or cannot any more (and is sent). As vLLM's
detokenizer, no stop string is looked for in the text of the first `min_tokens` tokens: one
must end in the text of a later token.

Token ids the tokenizer does not know (a model vocabulary padded past it) add no text and never
raise; with no tokenizer at all (`NoTokenizer`) the text stays "" and stop strings are refused
up front, since nothing could match them.
"""

from __future__ import annotations

from collections.abc import Sequence

from afdserve.model.tokenizer import IncrementalDetokenizer, NoTokenizer, Tokenizer


class TextStream:
    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = (), min_tokens: int = 0) -> None:
        if stop and isinstance(tokenizer, NoTokenizer):
            raise tokenizer.unavailable("stop strings (matched on the output text)")
        self._detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=True)
        self._stop = tuple(stop)
        self._unchecked_tokens = min_tokens
        """Tokens still to come whose text no stop string may end in (min_tokens)."""
        self._longest = max((len(s) for s in self._stop), default=0)
        self.text = ""
        """All final text so far (cut before the stop string once one matched)."""
        self.stopped = False
        """A stop string matched; later tokens add no text."""
        self._sent = 0

    def push(self, token_id: int) -> None:
        if not self.stopped:
            check = self._unchecked_tokens <= 0
            self._unchecked_tokens -= 1
            self._append(self._detok.push(token_id), check)

    def finish(self) -> None:
        """The request ended: release whatever the detokenizer held back."""
        if not self.stopped:
            self._append(self._detok.flush(), self._unchecked_tokens < 0)

    def take(self, final: bool = False) -> str:
        """Text not yet handed out; unless `final` (or stopped), minus a possible stop prefix."""
        end = len(self.text)
        if not (final or self.stopped):
            end -= self._stop_prefix_len()
        out = self.text[self._sent : end]
        self._sent = max(self._sent, end)
        return out

    def _append(self, delta: str, check: bool = True) -> None:
        if not delta:
            return
        old = len(self.text)
        self.text += delta
        if not (self._stop and check):
            return
        # a stop string that ends in the new text (earlier ones were looked for already, or
        # fell within min_tokens)
        hits = [i for s in self._stop if (i := self.text.find(s, max(0, old - len(s) + 1))) >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True

    def _stop_prefix_len(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        for k in range(min(self._longest - 1, len(self.text)), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self._stop):
                return k
        return 0
