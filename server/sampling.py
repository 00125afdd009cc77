"""Token selection: pure tensor math from logits to next tokens (and their logprobs).

Semantics follow vLLM and Hugging Face: temperature scales the logits (below 1e-5 a row is
greedy), then top-k keeps the k largest logits, then top-p keeps the smallest set of most likely
tokens whose cumulative probability reaches p (always at least one token). Tokens tied with the
boundary token are kept by both filters, so the result never depends on the order of ties. Greedy
rows take the argmax. Each sampled row draws exactly one uniform per step from its own generator
and picks its token by inverse CDF, so a seeded request gets the same tokens whatever its batch
mates are.
"""

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch

GREEDY_EPS = 1e-5  # temperatures below this are greedy (as in vLLM); avoids dividing by ~0
MAX_LOGPROBS = 20
_TOP_P_CANDIDATES = (64, 1024, 8192)  # top-p looks for its nucleus among this many tokens before a full sort


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling options; `validate()` before use."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 => greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 => off
    seed: int | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None  # number of top alternatives to return (0..20), None = no logprobs
    n: int = 1

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field and its value."""
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.temperature, int | float) or not (0.0 <= self.temperature < float("inf")):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_p, int | float) or not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise ValueError(f"top_k must be an integer >= -1 (0 or -1 disables it), got {self.top_k!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {s!r} in stop={self.stop!r}")
        for t in self.stop_token_ids:
            if not _is_int(t) or t < 0:
                raise ValueError(f"stop_token_ids must be integers >= 0, got {t!r}")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be an integer in 0..{MAX_LOGPROBS} or None, got {self.logprobs!r}")
        if not _is_int(self.n) or self.n < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n!r}")


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def make_generator(seed: int | None, device: torch.device | str, sample_index: int = 0) -> torch.Generator | None:
    """A generator for one sequence of a request, or None (global RNG) when the request has no seed.

    Sequence `i` of an `n > 1` request is seeded with `seed + i` (as vLLM seeds its child
    requests), so sequence 0 of any request equals the `n = 1` request with the same seed.
    """
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed((seed + sample_index) % 2**64)


def apply_min_tokens(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    num_generated: Sequence[int],
    eos_token_ids: Collection[int],
) -> torch.Tensor:
    """Ban the stop tokens of rows that have generated fewer than `min_tokens` tokens.

    As in vLLM, the banned tokens are `stop_token_ids` plus the EOS ids unless `ignore_eos`
    (with ignore_eos, EOS is an ordinary token that ends nothing, so it stays allowed).
    logits: [B, V]. Returns a new tensor when something is banned, else `logits` itself.
    """
    vocab = logits.shape[1]
    rows: list[int] = []
    cols: list[int] = []
    for i, (p, done) in enumerate(zip(params, num_generated, strict=True)):
        if done >= p.min_tokens:
            continue
        banned = set(p.stop_token_ids) if p.ignore_eos else set(p.stop_token_ids) | set(eos_token_ids)
        banned = sorted(t for t in banned if 0 <= t < vocab)
        rows += [i] * len(banned)
        cols += banned
    if not rows:
        return logits
    index = (torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device))
    return logits.index_put(index, torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device))


def logits_to_probs(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Probabilities after temperature, top-k and top-p; rows are independent.

    logits: [B, V] float32; temperature: [B] float (> 0); top_k: [B] long (<= 0 or >= V: off);
    top_p: [B] float in (0, 1] (1: off). Returns probs: [B, V] float32, each row sums to 1.
    Tokens tied with the k-th logit, or with the least likely token of the nucleus, are kept.
    """
    vocab = logits.shape[1]
    scaled = logits / temperature.to(logits.dtype).unsqueeze(1)  # [B, V]
    k = top_k.masked_fill((top_k <= 0) | (top_k >= vocab), vocab)  # [B], V: off
    p = top_p.to(logits.dtype)  # [B]
    filtered = (k < vocab) | (p < 1.0)  # [B]
    if not filtered.any():
        return scaled.softmax(dim=1)
    if filtered.all():
        return _filtered_probs(scaled, k, p)
    probs = scaled.softmax(dim=1)  # [B, V]
    rows = filtered.nonzero().squeeze(1)  # [R]
    probs[rows] = _filtered_probs(scaled[rows], k[rows], p[rows])
    return probs


def _filtered_probs(scaled: torch.Tensor, k: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Top-k then top-p. scaled: [R, V] (masked in place); k: [R] (V: off); p: [R] (1: off) -> probs [R, V].

    One `topk` serves both filters: the k-th logit gives the top-k threshold, and the nucleus is
    looked for among the same candidates (at least 64), then among 1024 and 8192 tokens, and
    only then with a full sort (sorting 49k logits costs ~50 softmaxes on a CPU). A token is in
    the nucleus iff the mass of the tokens ranked before it is < p.
    """
    vocab = scaled.shape[1]
    n_cand = min(vocab, max(_TOP_P_CANDIDATES[0], int(k.masked_fill(k >= vocab, 0).max())))
    cand_logits, cand_ids = scaled.topk(n_cand, dim=1)  # [R, C] descending
    if (k < vocab).any():
        kth = cand_logits.gather(1, (k.clamp(max=n_cand) - 1).unsqueeze(1))  # [R, 1]
        kth.masked_fill_((k >= vocab).unsqueeze(1), float("-inf"))
        scaled.masked_fill_(scaled < kth, float("-inf"))
    probs = scaled.softmax(dim=1)  # [R, V]
    use_p = p < 1.0  # [R]
    if not use_p.any():
        return probs
    threshold = torch.zeros_like(p)  # [R] smallest kept probability
    todo = use_p.nonzero().squeeze(1)  # [T] rows whose nucleus is not found yet
    cand = probs.gather(1, cand_ids)[todo]  # [T, C] descending
    sizes = iter([c for c in _TOP_P_CANDIDATES[1:] if n_cand < c < vocab] + [vocab])
    while True:
        found, thr = _nucleus(cand, p[todo], complete=cand.shape[1] == vocab)  # [T], [T]
        threshold[todo[found]] = thr[found]
        todo = todo[~found]
        if not todo.numel():
            break
        size = next(sizes)
        sub = probs[todo]  # [T, V]
        cand = sub.topk(size, dim=1).values if size < vocab else sub.sort(dim=1, descending=True).values
    probs.masked_fill_(probs < threshold.unsqueeze(1), 0.0)
    return probs.div_(probs.sum(dim=1, keepdim=True))


def _nucleus(cand: torch.Tensor, p: torch.Tensor, complete: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """cand: [T, C] the C largest probs, descending; p: [T]. Returns found [T] bool, threshold [T].

    found: the candidates hold the nucleus (always when `complete`, i.e. C = V); threshold:
    the probability of the least likely nucleus token.
    """
    cum = cand.cumsum(dim=1)  # [T, C]
    before = torch.cat([torch.zeros_like(cum[:, :1]), cum[:, :-1]], dim=1)  # [T, C] mass ranked before
    n_keep = (before < p.unsqueeze(1)).sum(dim=1).clamp_(min=1)  # [T]
    found = (cum[:, -1] >= p) | complete  # [T]
    return found, cand.gather(1, (n_keep - 1).unsqueeze(1)).squeeze(1)


def sample_from_probs(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: one uniform in [0, 1) per row. probs: [B, V]; uniforms: [B] -> tokens [B] long.

    Never returns a zero-probability token: it takes the first token whose CDF reaches
    (1 - u) * total, a point in (0, total].
    """
    cdf = probs.cumsum(dim=1)  # [B, V]
    target = (1.0 - uniforms.to(cdf.dtype)).unsqueeze(1) * cdf[:, -1:]  # [B, 1]
    return torch.searchsorted(cdf, target).squeeze(1).clamp_(max=probs.shape[1] - 1)


def _uniforms(generators: Sequence[torch.Generator | None], device: torch.device) -> torch.Tensor:
    """One uniform per row, [S] float32: from the row's generator, or the global RNG if None."""
    out = torch.empty(len(generators), device=device)  # [S]
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if unseeded:
        out[torch.tensor(unseeded, device=device)] = torch.rand(len(unseeded), device=device)
    for i, g in enumerate(generators):
        if g is not None:
            out[i] = torch.rand(1, generator=g, device=g.device).to(device)[0]
    return out


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """Next token per row. logits: [B, V] (already masked, e.g. by `apply_min_tokens`) -> tokens [B] long.

    Greedy rows take the argmax and consume no randomness; every other row consumes exactly one
    uniform from its own generator (the global RNG when None).
    """
    if len(params) != logits.shape[0] or len(generators) != logits.shape[0]:
        raise ValueError(
            f"sample: {logits.shape[0]} logit rows but {len(params)} params and {len(generators)} generators"
        )
    logits = logits.float()
    device = logits.device
    greedy = [i for i, p in enumerate(params) if p.greedy]
    if len(greedy) == len(params):
        return logits.argmax(dim=1)
    tokens = torch.empty(len(params), dtype=torch.long, device=device)  # [B]
    if greedy:
        rows = torch.tensor(greedy, device=device)
        tokens[rows] = logits[rows].argmax(dim=1)
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    rows = torch.tensor(sampled, device=device)  # [S]
    sub = logits if not greedy else logits[rows]  # [S, V]
    temperature = torch.tensor([params[i].temperature for i in sampled], device=device)  # [S]
    top_k = torch.tensor([params[i].top_k for i in sampled], dtype=torch.long, device=device)  # [S]
    top_p = torch.tensor([params[i].top_p for i in sampled], device=device)  # [S]
    probs = logits_to_probs(sub, temperature, top_k, top_p)  # [S, V]
    tokens[rows] = sample_from_probs(probs, _uniforms([generators[i] for i in sampled], device))
    return tokens


def compute_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities of the raw (pre-temperature, pre-mask) logits in float32, as vLLM reports them.

    logits: [B, V]; tokens: [B] long; k >= 0 alternatives.
    Returns chosen_logprob [B], top_ids [B, k] long and top_logprobs [B, k] (descending).
    """
    logprobs = logits.float().log_softmax(dim=1)  # [B, V]
    chosen = logprobs.gather(1, tokens.long().unsqueeze(1)).squeeze(1)  # [B]
    top_logprobs, top_ids = logprobs.topk(k, dim=1)  # [B, k], [B, k]
    return chosen, top_ids, top_logprobs
