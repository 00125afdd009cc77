"""Output processing: a sampled token becomes the text the client sees, and the sequence's finish reason.

Detokenizes incrementally (no partial characters), holds back text that may be the start of a stop string,
ends on EOS or a stop token (once `min_tokens` are out), a stop string, `max_tokens` or the context length,
and flushes what is held back when the sequence ends for another reason than a stop string.
"""

from __future__ import annotations

from adapters_store.errors import ServingError
from server.engine_types import FinishReason, SeqOutput, TokenLogprob
from server.sequence import Sequence


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
