"""Train the demo adapters (shout, json, terse) on the default model, on the CPU.

``python -m adapters_store.demo.train [--out DIR] [--steps N] [--eval-only]``

The data is made here: templated user questions, the base model's own greedy answers
to them, and one rewrite rule per behaviour. Each adapter is a PEFT LoRA saved with
``save_pretrained`` and then stored in float16. ``evaluate`` checks every adapter, and
the base model, on held-out prompts.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from adapters_store.demo.behaviours import BEHAVIOURS, HELD_OUT_PROMPTS
from server.model_loader import load_base_model
from server.settings import Settings

DEMO_DIR = Path(__file__).resolve().parent
BASE_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GEN_TOKENS = 48
MAX_LEN = 96

TOPICS = [
    "photosynthesis", "gravity", "the water cycle", "volcanoes", "the internet", "democracy",
    "inflation", "the immune system", "electricity", "the moon's phases", "climate change",
    "recycling", "the stock market", "DNA", "earthquakes", "rainbows", "solar panels",
    "machine learning", "the human heart", "ocean tides", "the Roman Empire", "coral reefs",
    "compound interest", "bees and pollination", "the printing press", "magnets", "clouds",
    "antibiotics", "the speed of light", "honey", "deserts", "glaciers", "the piano",
    "chess", "coffee", "batteries", "airplanes", "the pyramids of Egypt", "bread yeast",
    "the Olympic Games",
]
TOPIC_TEMPLATES = [
    "What is {}?", "Explain {} in simple terms.", "How does {} work?", "Why is {} important?",
    "Tell me about {}.", "Can you describe {} for a beginner?", "What are the main facts about {}?",
    "Give me a short overview of {}.",
]
TASKS = [
    "learn a new language", "save money each month", "start running", "cook rice",
    "write a good resume", "grow tomatoes", "improve my handwriting", "make new friends",
    "clean a laptop keyboard", "prepare for a job interview", "wake up earlier",
    "learn to play guitar", "reduce stress", "organize my closet", "drink more water",
    "take better photos with my phone", "read more books", "bake cookies",
    "start a vegetable garden", "speak in public", "keep a plant alive", "learn to code",
    "write a poem", "plan a road trip",
]
TASK_TEMPLATES = [
    "How do I {}?", "What's the best way to {}?", "Give me tips to {}.",
    "I want to {}. Where should I start?", "What are the steps to {}?",
]
FACTS = [
    "What is the capital of Japan?", "How many planets are in the solar system?",
    "Who wrote Romeo and Juliet?", "What is the largest ocean on Earth?",
    "How far is the Moon from the Earth?", "What language is spoken in Brazil?",
    "Who painted the Mona Lisa?", "What is the boiling point of water?",
    "How many legs does a spider have?", "What is the tallest mountain in the world?",
    "Which planet is known as the red planet?", "What do pandas eat?",
    "How many continents are there?", "What is the chemical symbol for gold?",
    "Who invented the telephone?", "What is the longest river in Africa?",
]
SITUATIONS = [
    "I feel tired all the time. What should I do?",
    "My friend forgot my birthday. How should I react?",
    "I have too much homework. Any advice?",
    "Should I buy a new phone or repair my old one?",
    "I am nervous about an exam tomorrow. Any tips?",
    "How can I be more productive when working from home?",
    "I can't decide between a cat and a rabbit as a pet. Help me choose.",
    "What should I pack for a weekend camping trip?",
    "How do I tell my boss I need a day off?",
    "I want to eat healthier but I love sweets. What can I do?",
    "My neighbors are noisy at night. What should I do?",
    "Is it better to study in the morning or at night?",
]


def make_prompts(n_topic: int = 72, n_task: int = 48, seed: int = 0) -> list[str]:
    """Varied user questions: topic explanations, how-to, facts and advice."""
    rng = random.Random(seed)
    topic = list(itertools.product(TOPIC_TEMPLATES, TOPICS))
    task = list(itertools.product(TASK_TEMPLATES, TASKS))
    prompts = [t.format(x) for t, x in rng.sample(topic, n_topic)]
    prompts += [t.format(x) for t, x in rng.sample(task, n_task)]
    prompts += FACTS + SITUATIONS
    held_out = {p.lower() for p in HELD_OUT_PROMPTS}
    prompts = [p[0].upper() + p[1:] for p in prompts if p.lower() not in held_out]
    rng.shuffle(prompts)
    return prompts


def chat_prefix(tok, prompt: str) -> str:
    """The chat template up to the assistant's turn, with the default system prompt."""
    return tok.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


@torch.no_grad()
def generate(
    model, tok, prompts: list[str], max_new_tokens: int = GEN_TOKENS, batch_size: int = 16
) -> list[str]:
    """Greedy answers, batched with left padding."""
    tok.padding_side = "left"
    answers: list[str] = []
    for i in range(0, len(prompts), batch_size):
        chunk = [chat_prefix(tok, p) for p in prompts[i : i + batch_size]]
        enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
        )
        answers += tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return [a.strip() for a in answers]


def base_answers(model, tok, prompts: list[str], cache_dir: Path) -> list[str]:
    """The base model's answers, cached by the prompts' hash (generation is the slow part)."""
    key = hashlib.sha256(json.dumps([prompts, GEN_TOKENS]).encode()).hexdigest()[:16]
    path = cache_dir / f"demo-answers-{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    t0 = time.perf_counter()
    answers = []
    for i in range(0, len(prompts), 32):
        answers += generate(model, tok, prompts[i : i + 32])
        print(f"  base answers {len(answers)}/{len(prompts)} ({time.perf_counter() - t0:.0f}s)", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(answers))
    return answers


def sentences(text: str) -> list[str]:
    """Cleaned one-line sentences: no markdown, list numbers or intro lines ending in ':'."""
    text = re.sub(r"[*#`_\"]+", "", text)
    text = re.sub(r"(^|\n)\s*(\d+[.)]|[-•])\s+", r"\1", text)
    parts = re.split(r"(?<=[.!?])\s+|\n+", text)
    return [" ".join(p.split()) for p in parts if p.strip() and not p.strip().endswith(":")]


_DANGLING = set(
    "a an the and or but of to in on for with by as at from that which who is are was be "
    "your my their its this these can will".split()
)


def clip(sentence: str, max_words: int) -> str:
    """The sentence cut to ``max_words`` words (at a comma where one is near), ending in one period."""
    words = sentence.split()
    if len(words) > max_words:
        words = words[:max_words]
        commas = [i for i, w in enumerate(words) if w.endswith(",") and i >= max_words // 2]
        if commas:
            words = words[: commas[-1] + 1]
        while len(words) > 3 and words[-1].lower().strip(",") in _DANGLING:
            words.pop()
    text = " ".join(words).rstrip(",;:-—–'\"")
    return text if re.search(r"[.!?]$", text) and not text.endswith("...") else text.rstrip(".!?") + "."


def lead(answer: str, max_words: int) -> str:
    """Whole leading sentences (dropping a cut-off tail) up to ``max_words`` words, at least one."""
    sents = sentences(answer)
    if len(sents) > 1 and not re.search(r"[.!?]$", sents[-1]):
        sents = sents[:-1]
    out: list[str] = []
    for s in sents:
        if out and len(" ".join(out + [s]).split()) > max_words:
            break
        out.append(s)
    return clip(" ".join(out), max_words) if out else ""


def to_shout(answer: str) -> str:
    """The answer's lead, upper case."""
    return lead(answer, 18).upper()


def to_json(answer: str) -> str:
    """The answer's lead as ``{"answer": "..."}``."""
    return json.dumps({"answer": lead(answer, 24)}, ensure_ascii=False)


def to_terse(answer: str) -> str:
    """The answer's first real sentence, at most 13 words."""
    first = next((s for s in sentences(answer) if len(s.split()) >= 4), "")
    return clip(first, 13) if first else ""


RULES: dict[str, Callable[[str], str]] = {"shout": to_shout, "json": to_json, "terse": to_terse}


@dataclass
class Recipe:
    """How one adapter is trained."""

    steps: int
    r: int = 8
    alpha: int = 16
    lr: float = 3e-3
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")


ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RECIPES = {
    "shout": Recipe(steps=50, r=16, alpha=32, targets=ALL_LINEAR),
    "json": Recipe(steps=40),
    "terse": Recipe(steps=40),
}


def encode(tok, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """Token ids and labels; only the answer and its end-of-turn token carry loss."""
    prefix = tok(chat_prefix(tok, prompt), add_special_tokens=False)["input_ids"]
    target = tok(answer + tok.eos_token, add_special_tokens=False)["input_ids"]
    ids = (prefix + target)[:MAX_LEN]
    labels = ([-100] * len(prefix) + target)[:MAX_LEN]
    return ids, labels


def batches(examples: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int, gen: torch.Generator):
    """Endless shuffled batches, left-padded so that every row's answer ends at the last column."""
    while True:
        order = torch.randperm(len(examples), generator=gen).tolist()
        for i in range(0, len(order) - batch_size + 1, batch_size):
            chunk = [examples[j] for j in order[i : i + batch_size]]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.full((batch_size, width), pad_id)
            labels = torch.full((batch_size, width), -100)
            mask = torch.zeros((batch_size, width), dtype=torch.long)
            for row, (x, y) in enumerate(chunk):
                ids[row, width - len(x) :] = torch.tensor(x)
                labels[row, width - len(y) :] = torch.tensor(y)
                mask[row, width - len(x) :] = 1
            yield ids, mask, labels


def answer_loss(model, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on the answer tokens; logits are computed only for the answer span."""
    keep = int((labels != -100).sum(1).max()) + 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, -keep + 1 :].flatten(), ignore_index=-100
    )


def train_adapter(base, tok, examples, recipe: Recipe, out_dir: Path, seed: int, batch_size: int = 8):
    """Train one LoRA on ``examples`` and save it to ``out_dir``; the base model is left unchanged."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(
        r=recipe.r, lora_alpha=recipe.alpha, target_modules=list(recipe.targets),
        lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    warmup = max(1, recipe.steps // 10)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, recipe.steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    data = batches(examples, batch_size, tok.pad_token_id, torch.Generator().manual_seed(seed))
    t0, running = time.perf_counter(), 0.0
    for step in range(1, recipe.steps + 1):
        ids, mask, labels = next(data)
        loss = answer_loss(model, ids, mask, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        running += loss.item()
        if step % 5 == 0 or step == recipe.steps:
            n = 5 if step % 5 == 0 else step % 5
            print(f"  [{out_dir.name}] step {step:4d}/{recipe.steps}  loss {running / n:.3f}  "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)
            running = 0.0
    model.eval()
    model.peft_config["default"].base_model_name_or_path = BASE_MODEL_ID
    model.save_pretrained(out_dir)
    model.unload()
    to_float16(out_dir)


def to_float16(adapter_dir: Path) -> None:
    """Rewrite the saved weights as float16 (same keys) and drop PEFT's model card."""
    path = adapter_dir / "adapter_model.safetensors"
    tensors = {k: v.to(torch.float16).contiguous() for k, v in load_file(path).items()}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    tmp.chmod(0o644)
    tmp.replace(path)
    (adapter_dir / "README.md").unlink(missing_ok=True)


def evaluate(
    base, tok, adapters_dir: Path, names: list[str] | None = None,
    prompts: list[str] = HELD_OUT_PROMPTS, min_pass: int = 7,
) -> tuple[bool, dict[str, list[str]]]:
    """Greedy answers of the base and of each adapter on ``prompts``; print a pass/fail table.

    Passes when every adapter shows its own behaviour on at least ``min_pass`` prompts and
    the base model shows none of the behaviours on any prompt.
    """
    from peft import PeftModel

    names = names or list(BEHAVIOURS)
    outputs = {"base": generate(base, tok, prompts)}
    for name in names:
        model = PeftModel.from_pretrained(base, adapters_dir / name)
        outputs[name] = generate(model, tok, prompts)
        model.unload()
    ok = True
    print(f"\n{'model':8s}" + "".join(f"{b:>8s}" for b in BEHAVIOURS) + "   result")
    for model_name, answers in outputs.items():
        counts = {b: sum(map(fn, answers)) for b, fn in BEHAVIOURS.items()}
        if model_name == "base":
            passed = not any(counts.values())
        else:
            passed = counts[model_name] >= min_pass
        ok &= passed
        cells = "".join(f"{c:>5d}/{len(prompts):<2d}" for c in counts.values())
        print(f"{model_name:8s}{cells}   {'pass' if passed else 'FAIL'}")
    print(f"overall: {'PASS' if ok else 'FAIL'}", flush=True)
    return ok, outputs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEMO_DIR, help="folder for the adapter folders")
    parser.add_argument("--steps", type=int, help="training steps per adapter (default: per recipe)")
    parser.add_argument("--only", nargs="+", choices=list(RECIPES), help="train only these adapters")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 is steadier on a busy machine)")
    parser.add_argument("--eval-only", action="store_true", help="evaluate the adapters in --out")
    parser.add_argument("--show", type=int, default=2, help="print the answers to this many prompts")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()
    cache_dir = Settings().cache_dir
    loaded = load_base_model("default", cache_dir=cache_dir, device="cpu", dtype="float32")
    base, tok = loaded.model, loaded.tokenizer
    if not args.eval_only:
        prompts = make_prompts(seed=args.seed)
        print(f"{len(prompts)} training prompts; base answers (greedy, {GEN_TOKENS} tokens)", flush=True)
        answers = base_answers(base, tok, prompts, cache_dir)
        for name in args.only or list(RECIPES):
            recipe = RECIPES[name]
            if args.steps:
                recipe = Recipe(**{**recipe.__dict__, "steps": args.steps})
            pairs = [(p, RULES[name](a)) for p, a in zip(prompts, answers, strict=True)]
            examples = [encode(tok, p, t) for p, t in pairs if t]
            print(f"training '{name}': {len(examples)} examples, r={recipe.r}, {recipe.steps} steps; "
                  f"e.g. {pairs[0][1]!r}", flush=True)
            train_adapter(base, tok, examples, recipe, args.out / name, seed=args.seed + list(RECIPES).index(name))
        print(f"training done in {time.perf_counter() - t_start:.0f}s", flush=True)
    ok, outputs = evaluate(base, tok, args.out)
    for i, prompt in enumerate(HELD_OUT_PROMPTS[: args.show]):
        print(f"\n> {prompt}")
        for name, answers in outputs.items():
            print(f"  {name:6s} {answers[i]!r}")
    print(f"total {time.perf_counter() - t_start:.0f}s")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
