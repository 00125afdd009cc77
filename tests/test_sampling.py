"""server.sampling against plain per-row reference implementations."""

import math

import pytest
import torch

from server.sampling import (
    SamplingParams,
    apply_min_tokens,
    compute_logprobs,
    logits_to_probs,
    make_generator,
    sample,
    sample_from_probs,
)


def reference_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """One row, float64, written the obvious way. logits: [V] -> probs [V]."""
    x = logits.double() / temperature
    if 0 < top_k < x.numel():
        kth = sorted(x.tolist(), reverse=True)[top_k - 1]
        x = torch.where(x < kth, -math.inf, x)
    probs = x.softmax(0)
    if top_p < 1.0:
        order = sorted(range(x.numel()), key=lambda i: -probs[i].item())
        keep = torch.zeros_like(probs, dtype=torch.bool)
        mass = 0.0
        for i in order:
            if mass >= top_p:
                break
            keep[i] = True
            mass += probs[i].item()
        probs = torch.where(keep, probs, 0.0)
        probs = probs / probs.sum()
    return probs


def test_greedy_rows_take_the_argmax_and_consume_no_randomness():
    torch.manual_seed(0)
    logits = torch.randn(6, 300)  # [B, V]
    params = [SamplingParams(temperature=0.0, seed=1), SamplingParams(temperature=0.0)] * 3
    gens = [make_generator(p.seed, "cpu") for p in params]
    assert torch.equal(sample(logits, params, gens), logits.argmax(dim=1))
    assert torch.equal(gens[0].get_state(), make_generator(1, "cpu").get_state())

    mixed = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, seed=3)] * 3
    tokens = sample(logits, mixed, [make_generator(p.seed, "cpu") for p in mixed])
    assert torch.equal(tokens[0::2], logits[0::2].argmax(dim=1))


@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [
        (1.0, 0, 1.0),
        (0.7, 0, 1.0),
        (1.3, 5, 1.0),
        (1.0, 0, 0.9),
        (0.5, 40, 0.8),
        (2.0, 1, 1.0),
        (1.0, 0, 1e-6),
        (1.0, -1, 0.5),
        (1.0, 10_000, 0.95),
    ],
)
def test_logits_to_probs_matches_reference(temperature, top_k, top_p):
    torch.manual_seed(1)
    logits = torch.randn(3, 2000) * 3  # [B, V]
    probs = logits_to_probs(logits, torch.full((3,), temperature), torch.full((3,), top_k), torch.full((3,), top_p))
    for row in range(3):
        ref = reference_probs(logits[row], temperature, top_k, top_p)
        assert torch.equal(probs[row] > 0, ref > 0)
        torch.testing.assert_close(probs[row].double(), ref, atol=1e-6, rtol=1e-4)


def test_logits_to_probs_rows_are_independent_and_cover_large_nuclei():
    torch.manual_seed(2)
    vocab = 20_000
    logits = torch.randn(6, vocab) * torch.tensor([[8.0], [3.5], [2.0], [0.1], [1.0], [2.0]])  # [6, V]
    temperature = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.2, 0.8])
    top_k = torch.tensor([0, 0, 0, 0, 7, 3000])
    top_p = torch.tensor([0.9, 0.9, 0.9, 0.9, 1.0, 0.9])
    probs = logits_to_probs(logits, temperature, top_k, top_p)
    kept = (probs > 0).sum(dim=1).tolist()
    # nuclei found among 64, 1024 and 8192 candidates, then by a full sort; top-k alone; top-k and top-p
    assert kept[0] <= 64 < kept[1] <= 1024 < kept[2] <= 8192 < kept[3], kept
    assert kept[4] == 7 and 64 < kept[5] < 3000, kept
    for row in range(6):
        ref = reference_probs(logits[row], temperature[row].item(), int(top_k[row]), top_p[row].item())
        assert torch.equal(probs[row] > 0, ref > 0)
        torch.testing.assert_close(probs[row].double(), ref, atol=1e-6, rtol=1e-4)
        one = slice(row, row + 1)
        assert torch.equal(logits_to_probs(logits[one], temperature[one], top_k[one], top_p[one])[0], probs[row])


def test_top_k_keeps_ties_with_the_kth_logit():
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0]])
    probs = logits_to_probs(logits, torch.ones(1), torch.tensor([2]), torch.ones(1))
    assert (probs[0] > 0).tolist() == [True, False, True, True, False]


def test_sample_from_probs_never_returns_a_zero_probability_token():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]] * 4)
    u = torch.tensor([0.0, 0.4999, 0.5, 1.0 - 2**-24])
    assert sample_from_probs(probs, u).tolist() == [3, 3, 1, 1]


def _run(logits_steps, params, gens):
    return torch.stack([sample(step, params, gens) for step in logits_steps], dim=1)  # [B, steps]


def test_seeded_rows_are_reproducible_whatever_the_batch():
    torch.manual_seed(3)
    steps, vocab = 12, 500
    mine = torch.randn(steps, vocab) * 2  # [steps, V] logits of the request under test
    p = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=1234)

    alone = _run(mine.unsqueeze(1), [p], [make_generator(p.seed, "cpu")])[0]  # [steps]

    mates = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.0), SamplingParams(seed=7, top_p=0.5)]
    batch_params = [mates[0], mates[1], p, mates[2]]
    batch = torch.randn(steps, 4, vocab)  # [steps, B, V]
    batch[:, 2] = mine
    gens = [make_generator(q.seed, "cpu") for q in batch_params]
    in_batch = _run(batch, batch_params, gens)[2]
    assert torch.equal(alone, in_batch)

    other_seed = _run(mine.unsqueeze(1), [p], [make_generator(99, "cpu")])[0]
    assert not torch.equal(alone, other_seed)


def test_make_generator_seeds_sequence_i_with_seed_plus_i():
    assert make_generator(None, "cpu") is None
    a = torch.rand(4, generator=make_generator(10, "cpu", sample_index=2))
    b = torch.rand(4, generator=make_generator(12, "cpu"))
    assert torch.equal(a, b)
    torch.rand(1, generator=make_generator(-1, "cpu"))  # negative seeds are valid


@pytest.mark.parametrize("seeded", [False, True])
def test_empirical_distribution_matches_probs(seeded):
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0, 1.5])  # [V]
    p = SamplingParams(temperature=0.8, top_k=6, top_p=0.97, seed=5 if seeded else None)
    expected = logits_to_probs(logits[None], torch.tensor([0.8]), torch.tensor([6]), torch.tensor([0.97]))[0]
    if seeded:
        draws, gen = 3000, make_generator(p.seed, "cpu")
        tokens = torch.cat([sample(logits[None], [p], [gen]) for _ in range(draws)])
    else:
        draws = 40_000
        torch.manual_seed(4)
        tokens = sample(logits.expand(draws, -1), [p] * draws, [None] * draws)
    counts = torch.bincount(tokens, minlength=logits.numel()).double()
    assert counts[expected == 0].sum() == 0
    support = expected > 0
    want = expected[support].double() * draws
    chi2 = ((counts[support] - want) ** 2 / want).sum().item()
    assert chi2 < 25.0, (chi2, counts, want)  # df <= 5; p(chi2 > 25) < 2e-4


def test_min_tokens_bans_eos_and_stop_ids_until_reached():
    logits = torch.zeros(4, 10)  # [B, V]
    params = [
        SamplingParams(min_tokens=3, stop_token_ids=(5,)),
        SamplingParams(min_tokens=3, stop_token_ids=(5,)),
        SamplingParams(min_tokens=3, ignore_eos=True, stop_token_ids=(7,)),
        SamplingParams(),
    ]
    out = apply_min_tokens(logits, params, [1, 3, 0, 0], eos_token_ids={2, 9})
    banned = {(r, c) for r, c in zip(*torch.isinf(out).nonzero(as_tuple=True), strict=True)}
    assert {(int(r), int(c)) for r, c in banned} == {(0, 2), (0, 5), (0, 9), (2, 7)}
    assert not torch.isinf(logits).any()
    assert apply_min_tokens(logits, params, [3, 3, 3, 3], eos_token_ids={2}) is logits
    tokens = sample(out, [SamplingParams(temperature=0.0)] * 4, [None] * 4)
    assert tokens[0] not in (2, 5, 9)


def test_compute_logprobs_matches_log_softmax():
    torch.manual_seed(5)
    logits = (torch.randn(5, 300) * 4).to(torch.bfloat16)  # [B, V]
    tokens = torch.tensor([0, 7, 299, 42, 42])
    chosen, top_ids, top_lp = compute_logprobs(logits, tokens, 4)
    ref = torch.log_softmax(logits.float(), dim=-1)
    torch.testing.assert_close(chosen, ref[torch.arange(5), tokens])
    ref_lp, ref_ids = ref.topk(4, dim=-1)
    assert torch.equal(top_ids, ref_ids)
    torch.testing.assert_close(top_lp, ref_lp)
    assert chosen.dtype == torch.float32 and top_ids.dtype == torch.long
    _, ids0, lp0 = compute_logprobs(logits, tokens, 0)
    assert ids0.shape == (5, 0) and lp0.shape == (5, 0)


def test_greedy_property():
    assert SamplingParams(temperature=0.0).greedy
    assert not SamplingParams(temperature=0.5).greedy


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"max_tokens": 4, "min_tokens": 5}, "min_tokens"),
        ({"n": 0}, "n"),
        ({"logprobs": 21}, "logprobs"),
        ({"logprobs": -1}, "logprobs"),
        ({"seed": 1.5}, "seed"),
        ({"stop": ("",)}, "stop"),
        ({"stop_token_ids": (-3,)}, "stop_token_ids"),
    ],
)
def test_validate_names_the_field_and_value(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field} ") as info:
        SamplingParams(**kwargs).validate()
    value = kwargs[field]
    assert str(value[0] if isinstance(value, tuple) else value) in str(info.value)


def test_validate_accepts_defaults_and_edges():
    SamplingParams().validate()
    SamplingParams(temperature=0.0, top_p=1.0, top_k=-1, logprobs=0, min_tokens=16, seed=-5).validate()
    SamplingParams(logprobs=20, n=4, stop=("\n",), stop_token_ids=(0,)).validate()
