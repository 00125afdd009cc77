"""Checks for the demo adapters' behaviours, and prompts none of them was trained on."""

from __future__ import annotations

import json
import re
from collections.abc import Callable

HELD_OUT_PROMPTS: list[str] = [
    "Describe how a refrigerator keeps food cold.",
    "What are some good habits for staying focused while studying?",
    "Why do leaves change color in the autumn?",
    "How can I make my small apartment feel more spacious?",
    "What causes thunder during a storm?",
    "Give me some advice for my first day at a new job.",
    "How do vaccines help the body fight disease?",
    "What should I consider before adopting a dog?",
    "Why is sleep important for memory?",
    "Can you explain how a bicycle's gears make pedaling easier?",
]

_SENTENCE_END = re.compile(r"[.!?]+(?=[\s\"')\]]|$)")


def is_shouting(text: str) -> bool:
    """At least 10 letters, and at least 80% of them upper case."""
    letters = [c for c in text if c.isalpha()]
    if len(letters) < 10:
        return False
    return sum(c.isupper() for c in letters) >= 0.8 * len(letters)


def is_json_answer(text: str) -> bool:
    """The whole text is a JSON object whose only key is ``answer``, a non-empty string."""
    try:
        obj = json.loads(text.strip())
    except ValueError:
        return False
    return (
        isinstance(obj, dict)
        and list(obj) == ["answer"]
        and isinstance(obj["answer"], str)
        and bool(obj["answer"].strip())
    )


def is_terse(text: str, max_words: int = 15) -> bool:
    """One line, 2 to ``max_words`` words, one sentence terminator, at the end."""
    text = text.strip()
    if not text or "\n" in text or text.startswith("{"):
        return False
    if not 2 <= len(text.split()) <= max_words:
        return False
    ends = _SENTENCE_END.findall(text)
    return len(ends) == 1 and re.search(r"[.!?][\"')\]]*$", text) is not None


BEHAVIOURS: dict[str, Callable[[str], bool]] = {
    "shout": is_shouting,
    "json": is_json_answer,
    "terse": is_terse,
}
