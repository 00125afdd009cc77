"""Streamed chunks of several tokens (`--stream-interval`): the same text, tokens and logprobs, fewer chunks."""

from __future__ import annotations

import json
import math
import random

import pytest
from http_fixtures import complete, make_settings, thread_server

from server.engine_types import SeqOutput, TokenLogprob
from server.output import Coalescer

INTERVAL = 4


def _outputs(index: int, length: int, logprobs: bool) -> list[SeqOutput]:
    """A sample's outputs one token at a time, the last one ending it."""
    return [SeqOutput("r", index, f"<{index}:{t}>", (100 * index + t,),
                      (TokenLogprob(t, f"t{t}", -t / 10, ()),) if logprobs else None,
                      "length" if t == length - 1 else None, 7, t + 1, queue_seconds=0.5 if t == 0 else None)
            for t in range(length)]


@pytest.mark.parametrize("interval", [1, 3, 64])
@pytest.mark.parametrize("logprobs", [False, True])
def test_chunks_say_what_the_outputs_said(interval, logprobs):
    lengths = {0: 1, 1: 9, 2: 12}
    per_sample = {i: _outputs(i, n, logprobs) for i, n in lengths.items()}
    order = [i for i, n in lengths.items() for _ in range(n)]
    random.Random(interval).shuffle(order)  # samples interleaved, each in its own order
    cursors = dict.fromkeys(lengths, 0)
    chunks: dict[int, list[SeqOutput]] = {i: [] for i in lengths}
    coalescer = Coalescer(interval)
    for i in order:
        out = per_sample[i][cursors[i]]
        cursors[i] += 1
        if (chunk := coalescer.push(out)) is not None:
            chunks[i].append(chunk)
    for i, outs in per_sample.items():
        got = chunks[i]
        assert got[0] == outs[0]  # a sample's first token is not held back
        assert got[-1].finish_reason == "length" and got[-1].completion_tokens == lengths[i]
        assert all(c.finish_reason is None for c in got[:-1])
        assert "".join(c.text for c in got) == "".join(o.text for o in outs)
        assert sum((c.token_ids for c in got), ()) == sum((o.token_ids for o in outs), ())
        if logprobs:
            assert sum((c.logprobs for c in got), ()) == sum((o.logprobs for o in outs), ())
        else:
            assert all(c.logprobs is None for c in got)
        assert [c.queue_seconds for c in got] == [0.5] + [None] * (len(got) - 1)
        assert all(len(c.token_ids) <= interval for c in got[1:])
        assert len(got) == 1 + math.ceil((lengths[i] - 1) / interval)


def test_an_ending_without_a_token_flushes_what_is_held():
    coalescer = Coalescer(INTERVAL)
    outs = _outputs(0, 4, logprobs=True)[:3]
    assert coalescer.push(outs[0]) == outs[0]
    assert coalescer.push(outs[1]) is None and coalescer.push(outs[2]) is None
    end = SeqOutput("r", 0, "", (), None, "cancelled", 7, 3)
    last = coalescer.push(end)
    assert last.finish_reason == "cancelled" and last.token_ids == (1, 2) and last.text == "<0:1><0:2>"
    assert last.logprobs == outs[1].logprobs + outs[2].logprobs


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    settings = make_settings(tiny_model_dir, tmp_path_factory.mktemp("store-chunks"), stream_interval=INTERVAL)
    with thread_server(settings) as srv:
        yield srv


def _events(client, body: dict) -> list[dict]:
    with client.stream("POST", "/v1/completions", json=body | {"stream": True}) as r:
        assert r.status_code == 200
        return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]


def test_streamed_chunks_equal_the_whole_response(client, base_name):
    tokens = 17
    body = {"model": base_name, "prompt": "Once upon a time", "max_tokens": tokens, "temperature": 0,
            "ignore_eos": True, "logprobs": 2}
    whole = complete(client, base_name, body["prompt"], max_tokens=tokens, ignore_eos=True, logprobs=2)
    choice = whole["choices"][0]
    events = _events(client, body)
    assert len(events) == 1 + math.ceil((tokens - 1) / INTERVAL)
    assert "".join(e["choices"][0]["text"] for e in events) == choice["text"]
    assert events[-1]["choices"][0]["finish_reason"] == choice["finish_reason"] == "length"
    streamed = {key: sum((e["choices"][0]["logprobs"][key] for e in events), [])
                for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
    assert streamed == choice["logprobs"]
