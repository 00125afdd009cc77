"""The mode policy on its own: merge decisions, admission and the merged-mode fairness bound."""

from server.router import Router, RouterConfig


def test_batched_never_merges():
    r = Router(RouterConfig("batched"))
    assert r.merged_key(["a"] * 8, None) is None
    assert r.may_admit("b")


def test_auto_merges_dominant_adapter_with_hysteresis():
    r = Router(RouterConfig("auto", merge_share=0.75, unmerge_share=0.5, min_rows=2))
    assert r.merged_key(["a"] * 6 + ["b", None], None) == "a"
    assert r.merged_key(["a"] * 5 + ["b", "c", None], None) is None  # 62% < 75%: stay batched
    assert r.merged_key(["a"] * 5 + ["b", "c", None], "a") == "a"  # merged stays while >= 50%
    assert r.merged_key(["a"] * 3 + ["b", "c", "d", None, None], "a") is None
    assert r.merged_key(["a"], None) is None  # fewer than min_rows
    assert r.merged_key([None] * 4, None) is None  # the base model is never "merged"


def test_merged_turns_are_fair():
    r = Router(RouterConfig("merged", max_turn_s=1.0))
    r.begin_step([], [("a", 0.0), ("b", 0.1)], now=0.2)
    assert r.turn == "a" and r.may_admit("a") and not r.may_admit("b")
    r.begin_step(["a"], [("a", 0.3), ("b", 0.1)], now=0.5)
    assert r.may_admit("a")  # b waited 0.4 s < 1 s
    r.begin_step(["a"], [("a", 0.3), ("b", 0.1)], now=1.2)
    assert not r.may_admit("a")  # b waited past the bound: the turn closes and drains
    r.begin_step([], [("a", 0.3), ("b", 0.1)], now=1.3)
    assert r.turn == "b" and r.may_admit("b") and not r.may_admit("a")
    assert r.merged_key([], "a") == "b"
