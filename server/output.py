"""Output processing: a sampled token becomes the text the client sees, and the sequence's finish reason.

Detokenizes incrementally (no partial characters), holds back text that may be the start of a stop string,
ends on EOS or a stop token (once `min_tokens` are out), a stop string, `max_tokens` or the context length,
and flushes what is held back when the sequence ends for another reason than a stop string.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from adapters_store.errors import ServingError
from server.engine_types import FinishReason, SeqOutput, TokenLogprob

if TYPE_CHECKING:
    from server.sequence import Sequence

UNSTREAMED_INTERVAL = 64  # tokens per chunk of a request whose caller wants the whole response only


class OutputProcessor:
    def __init__(self, max_model_len: int):
        self.max_model_len = max_model_len

    def on_token(self, seq: Sequence, token: int, logprob: TokenLogprob | None,
                 queue_seconds: float | None) -> SeqOutput:
        """Append `token` to the sequence; the output carries finish_reason when this token ends it."""
        p = seq.req.params
        seq.output_ids.append(token)
        n_out = len(seq.output_ids)
        reason: FinishReason | None = None
        if token in seq.stop_ids and n_out >= p.min_tokens:
            reason, text = "stop", ""
        else:
            text, stopped = seq.stopper.push(seq.detok.add(token))
            if stopped:
                reason = "stop"
        if reason is None and (n_out >= p.max_tokens or seq.length >= self.max_model_len):
            reason = "length"
        if reason is not None and not seq.stopper.stopped:  # no stop string ended it: flush what is held back
            tail, _ = seq.stopper.push(seq.detok.flush())
            text += tail if seq.stopper.stopped else tail + seq.stopper.flush()
        return SeqOutput(
            request_id=seq.req.request_id, index=seq.index, text=text, token_ids=(token,),
            logprobs=(logprob,) if logprob is not None else None, finish_reason=reason,
            prompt_tokens=seq.prompt_len, completion_tokens=n_out, queue_seconds=queue_seconds,
        )

    @staticmethod
    def on_end(seq: Sequence, reason: FinishReason, error: ServingError | None = None) -> SeqOutput:
        """The last output of a sequence that ends without a sampled token (cancelled, failed)."""
        return SeqOutput(
            request_id=seq.req.request_id, index=seq.index, text="", token_ids=(), logprobs=None,
            finish_reason=reason, prompt_tokens=seq.prompt_len, completion_tokens=len(seq.output_ids),
            error=error,
        )


def merge(first: SeqOutput, then: SeqOutput) -> SeqOutput:
    """One output of the same sample saying what `first` and then `then` said."""
    logprobs = None if first.logprobs is None else first.logprobs + (then.logprobs or ())
    return replace(then, text=first.text + then.text, token_ids=first.token_ids + then.token_ids, logprobs=logprobs,
                   queue_seconds=first.queue_seconds if first.queue_seconds is not None else then.queue_seconds)


class Coalescer:
    """Groups a request's outputs into chunks of `interval` tokens per sample.

    A sample's first output and its last go out at once, so time to first token and the end are not delayed;
    what is between goes out every `interval` tokens, which cuts the per-chunk cost of streaming (an event,
    and in a cluster two Ray messages) by that factor."""

    def __init__(self, interval: int):
        self.interval = interval
        self._pending: dict[int, SeqOutput] = {}  # sample index -> its output not yet sent
        self._started: set[int] = set()  # samples whose first output was sent

    def push(self, out: SeqOutput) -> SeqOutput | None:
        """The chunk to send now, or None while `out` waits for more tokens of its sample."""
        held = self._pending.pop(out.index, None)
        chunk = out if held is None else merge(held, out)
        first = out.index not in self._started
        if first or chunk.finish_reason is not None or len(chunk.token_ids) >= self.interval:
            self._started.add(out.index)
            return chunk
        self._pending[out.index] = chunk
        return None
