"""Streaming text: incremental detokenization and stop-string hold-back."""

from collections.abc import Sequence

_REPLACEMENT = "\ufffd"
_PROMPT_CONTEXT = 5  # prompt tokens decoded with the first generated ones (as vLLM)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas; never emits a partial multi-byte character.

    The "prefix offset / read offset" technique of vLLM and TGI: each step decodes the window
    `ids[prefix:]` and the already emitted `ids[prefix:read]`, and emits the suffix difference
    once the window's text no longer ends in U+FFFD (an incomplete UTF-8 sequence from
    byte-level tokens). Decoding from the same start keeps tokenizers that strip a leading
    space (SentencePiece) consistent. Cost per token is O(window), not O(length): the window
    only grows while the text ends in U+FFFD or new tokens decode to nothing (special tokens
    that decoding skips are dropped up front, so a run of ignored EOS tokens costs nothing).

    With no prompt, the concatenated deltas plus `flush()` equal
    `tokenizer.decode(generated_ids, skip_special_tokens=..., clean_up_tokenization_spaces=False)`
    (clean-up is not incremental, so it is always off). With `prompt_ids`, the first tokens are
    decoded in the context of the prompt's last tokens, so a SentencePiece leading space is kept;
    for byte-level BPE tokenizers the text is the same.
    """

    def __init__(self, tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = list(prompt_ids[-_PROMPT_CONTEXT:])  # window from the prefix offset
        self._read = len(self._ids)  # read offset within the window
        self._prefix_text = self._decode(self._ids)
        self._text = ""
        special = tokenizer.all_special_ids if skip_special_tokens else ()
        self._skipped_ids = frozenset(t for t in special if self._decode([t]) == "")

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(
            ids, skip_special_tokens=self._skip_special_tokens, clean_up_tokenization_spaces=False
        )

    def _advance(self, final: bool) -> str:
        new_text = self._decode(self._ids)
        if len(new_text) <= len(self._prefix_text) or (not final and new_text.endswith(_REPLACEMENT)):
            return ""
        delta = new_text[len(self._prefix_text) :]
        del self._ids[: self._read]  # the read offset becomes the prefix offset
        self._read = len(self._ids)
        self._prefix_text = self._decode(self._ids)
        self._text += delta
        return delta

    def add(self, token_id: int) -> str:
        """Append one generated token; return the newly finalized text (may be "")."""
        if token_id in self._skipped_ids:  # decodes to nothing: keep it out of the window
            return ""
        self._ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """At the end of the sequence: whatever is pending, even if it ends in U+FFFD."""
        return self._advance(final=True)

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return self._text


class StopStringMatcher:
    """Holds back text that could be the start of a stop string; the stop string never appears in the output.

    Emitted text plus `pending` always equals the input so far, up to the stop. The sequence
    stops at the first point where a stop string is complete (if several complete there, the
    longest counts), whatever the split into deltas; `push` then returns the text before that
    occurrence and True, and the matcher stays stopped.
    """

    def __init__(self, stops: Sequence[str]):
        if any(not isinstance(s, str) or not s for s in stops):
            raise ValueError(f"stop strings must be non-empty strings, got {list(stops)!r}")
        self._stops = tuple(dict.fromkeys(stops))
        self._held = ""
        self._stopped = False

    @property
    def stopped(self) -> bool:
        return self._stopped

    @property
    def pending(self) -> str:
        """Text held back because it could start a stop string."""
        return self._held

    def push(self, delta: str) -> tuple[str, bool]:
        """Feed new text; return (text safe to emit now, stopped?)."""
        if self._stopped:
            return "", True
        buf = self._held + delta
        hits = [(i + len(s), i) for s in self._stops if (i := buf.find(s)) >= 0]  # (end, start)
        if hits:
            self._stopped = True
            self._held = ""
            return buf[: min(hits)[1]], True
        keep = self._stop_prefix_start(buf)
        self._held = buf[keep:]
        return buf[:keep], False

    def _stop_prefix_start(self, buf: str) -> int:
        """Start of the longest suffix of `buf` that is a proper prefix of some stop (len(buf) if none)."""
        best = len(buf)
        for s in self._stops:
            j = buf.find(s[0], max(0, len(buf) - len(s) + 1))
            while 0 <= j < best:
                if s.startswith(buf[j:]):
                    best = j
                    break
                j = buf.find(s[0], j + 1)
        return best

    def flush(self) -> str:
        """Remaining held-back text, when the sequence ends for another reason than a stop."""
        held, self._held = self._held, ""
        return held
