"""The shipped offline reasoning task, in Open-R1 Mixture-of-Thoughts format, and its tokenizer.

No hub is reachable in CI, so the embedded default trains on this: three domains mirroring
Mixture-of-Thoughts' math / code / science, and a fourth, the positive control, each with a checkable answer.

- math     multi-step integer arithmetic; the working inside <think>...</think>, then \\boxed{n}.
- code     tiny Python functions; the answer is a ```python block, checked by the row's `tests`.
- science  multiple choice built from rules (speed, density, Ohm's law, ...); answered \\boxed{B}.
- mental   the positive control: a chain of operations on one-digit operands whose result is emitted
           *directly* (the think block is a fixed sentence), so its digits must be computed inside one
           forward pass -- the hard tokens are depth-bound by construction, the rest is template.

Most tokens are template (easy); the results of operations are genuinely hard for a small model.
Difficulty is set by `--steps`, `--math-digits` and `--digits` (defaults: 1-2 operations on 1-digit
operands, which the shipped 0.9 M base learns to ~85 %; 3 steps of 2 digits it never learns, see
docs/results.md). Rows are {"messages": [user, assistant], "num_tokens",
"source", "answer", "tests"}; files are `<domain>/{train,validation,test}-00000-of-00001.jsonl`.
The tokenizer is a byte-level BPE (digits split one per token) with a Qwen3-style chat template.

    python -m tah.data.tinytask                           # regenerates tah/assets/tinytask byte-identically
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from importlib.resources import files
from pathlib import Path
from typing import Any, Callable

DOMAINS = ("math", "code", "science", "mental")
SPLITS = {"train": 2000, "validation": 100, "test": 200}
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
THINK_TOKENS = ["<think>", "</think>"]
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def _assistant(think: str, answer: str) -> str:
    return f"<think>\n{think}\n</think>\n\n{answer}"


# ---------------------------------------------------------------------------------------- math
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def make_math(rng: random.Random, steps: int, digits: int) -> dict[str, Any]:
    n_steps = rng.randint(max(1, steps - 1), steps)
    hi = 10 ** digits - 1
    value = rng.randint(2, hi)
    expr = str(value)
    lines = []
    for i in range(n_steps):
        op = rng.choice("+-*" if abs(value) < 10 ** (digits + 1) else "+-")
        b = rng.randint(2, 9 if op == "*" else hi)
        new = _OPS[op](value, b)
        lines.append(f"Step {i + 1}: {value} {op} {b} = {new}.")
        expr = f"({expr} {op} {b})" if i < n_steps - 1 else f"{expr} {op} {b}"
        value = new
    phr = rng.choice(["Compute {e}.", "What is {e}?", "Evaluate {e}.", "Calculate the value of {e}."])
    think = "We evaluate from the innermost brackets outwards.\n" + "\n".join(lines) + f"\nSo the result is {value}."
    return {"question": phr.format(e=expr), "think": think,
            "answer_text": f"The answer is $\\boxed{{{value}}}$.", "answer": str(value), "tests": []}


# ---------------------------------------------------------------------------------------- code
def _code_tasks(rng: random.Random, digits: int) -> list[tuple[str, str, str, Callable, list]]:
    """(description, argument, body, reference function, test inputs); two parameters each, so that
    thousands of distinct questions exist."""
    hi = 10 ** digits - 1
    a, b, c = rng.randint(2, 9), rng.randint(1, hi), rng.randint(2, 9)
    k = rng.randint(0, 15)
    m = k + rng.randint(2, 15)
    ch = rng.choice("abcdefghijklmnopqrstuvwxyz")
    lists = [[rng.randint(0, 30) for _ in range(rng.randint(3, 6))] for _ in range(3)]
    ints = [rng.randint(0, 30) for _ in range(3)]
    return [
        (f"returns {a} * x + {b}", "x", f"return {a} * x + {b}", lambda x: a * x + b, ints),
        (f"returns x * x - {b}", "x", f"return x * x - {b}", lambda x: x * x - b, ints),
        (f"returns x % {c} + {b}", "x", f"return x % {c} + {b}", lambda x: x % c + b, ints),
        (f"returns the sum of the elements of xs that are greater than {k} and less than {m}", "xs",
         f"return sum(x for x in xs if {k} < x < {m})", lambda xs: sum(x for x in xs if k < x < m), lists),
        (f"returns how many elements of xs are divisible by {c}, plus {b}", "xs",
         f"return sum(1 for x in xs if x % {c} == 0) + {b}", lambda xs: sum(1 for x in xs if x % c == 0) + b, lists),
        (f"returns the largest element of xs times {a}, minus {b}", "xs", f"return max(xs) * {a} - {b}",
         lambda xs: max(xs) * a - b, lists),
        (f"returns the sum of the integers from 1 to n, multiplied by {a}, plus {b}", "n",
         f"return {a} * n * (n + 1) // 2 + {b}", lambda n: a * n * (n + 1) // 2 + b, [max(1, x) for x in ints]),
        (f"returns the string s repeated {c} times followed by '{ch}'", "s", f"return s * {c} + '{ch}'",
         lambda s: s * c + ch, [rng.choice(["ab", "x", "hi", "no", "z"]) for _ in range(3)]),
    ]


def make_code(rng: random.Random, steps: int, digits: int) -> dict[str, Any]:
    desc, arg, body, fn, inputs = rng.choice(_code_tasks(rng, digits))
    examples = [(x, fn(x)) for x in inputs]
    think = (f"The function takes {arg} and {desc}.\n"
             + "\n".join(f"Check: f({x!r}) should be {y}." for x, y in examples[:max(1, steps - 1)])
             + f"\nA one-line body is enough: {body}.")
    code = f"def f({arg}):\n    {body}\n"
    return {"question": f"Write a Python function `f({arg})` that {desc}.", "think": think,
            "answer_text": f"```python\n{code}```", "answer": code,
            "tests": [f"assert f({x!r}) == {y!r}" for x, y in examples]}


# ------------------------------------------------------------------------------------- science
def _science_rule(rng: random.Random, digits: int) -> tuple[str, str, int, str]:
    t = rng.randint(2, 9)
    r = rng.randint(2, 10 ** digits // 2)
    kind = rng.randrange(4)
    if kind == 0:
        return (f"A train travels {r * t} km in {t} hours. What is its average speed?",
                f"speed = distance / time = {r * t} / {t} = {r} km/h", r, "km/h")
    if kind == 1:
        return (f"A block has a mass of {r * t} g and a volume of {t} cm^3. What is its density?",
                f"density = mass / volume = {r * t} / {t} = {r} g/cm^3", r, "g/cm^3")
    if kind == 2:
        return (f"A current of {t} A flows through a resistor of {r} ohm. What is the voltage across it?",
                f"V = I * R = {t} * {r} = {t * r} V", t * r, "V")
    return (f"A force of {r * t} N acts on an area of {t} m^2. What is the pressure?",
            f"pressure = force / area = {r * t} / {t} = {r} Pa", r, "Pa")


def make_science(rng: random.Random, steps: int, digits: int) -> dict[str, Any]:
    question, working, value, unit = _science_rule(rng, digits)
    wrong = set()
    while len(wrong) < 3:
        cand = rng.choice([value + rng.randint(1, 9), value - rng.randint(1, 9), value * 2, max(1, value // 2)])
        if cand != value and cand > 0:
            wrong.add(cand)
    options = sorted(wrong) + [value]
    rng.shuffle(options)
    letters = "ABCD"
    letter = letters[options.index(value)]
    opts = "\n".join(f"{letters[i]}) {v} {unit}" for i, v in enumerate(options))
    think = f"Use the rule: {working}.\nThe option with {value} {unit} is {letter}."
    return {"question": f"{question}\n{opts}\nAnswer with the letter of the correct option.", "think": think,
            "answer_text": f"The answer is $\\boxed{{{letter}}}$.", "answer": letter, "tests": []}


# -------------------------------------------------------------------------------------- mental
MENTAL_THINK = "Mental arithmetic: the result is given without written working."


def make_mental(rng: random.Random, steps: int, digits: int) -> dict[str, Any]:
    """`steps` operations on one-digit operands, innermost first, e.g. ((7 - 3) * 4) + 5; the answer's
    digits follow a fixed sentence, so no written step can carry the intermediate values: the model
    must hold them in its layers. A product is drawn only while the value is below 20, so results stay
    at two or three digits. `digits` is not used: one-digit operands keep each single step learnable
    (the math domain writes the same steps out)."""
    value = rng.randint(2, 9)
    expr = str(value)
    for i in range(steps):
        op = rng.choice("+-*" if abs(value) < 20 else "+-")
        b = rng.randint(2, 9)
        value = _OPS[op](value, b)
        expr = f"({expr} {op} {b})" if i < steps - 1 else f"{expr} {op} {b}"
    return {"question": f"Compute {expr} in your head and give only the result.", "think": MENTAL_THINK,
            "answer_text": f"The answer is $\\boxed{{{value}}}$.", "answer": str(value), "tests": []}


MAKERS = {"math": make_math, "code": make_code, "science": make_science, "mental": make_mental}


def generate(seed: int = 0, steps: int = 2, digits: int = 2, sizes: dict[str, int] | None = None,
             math_digits: int | None = 1, mental_steps: int = 2) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """{domain: {split: rows}} with no question shared between splits (deduplicated on the text).
    `math_digits` (None or 0: `digits`) sets the math operands apart from code and science, whose
    question pools need 2 digits to hold enough distinct questions; `mental_steps` is the number of
    operations the mental family chains (its operands are always one digit)."""
    sizes = sizes or SPLITS
    difficulty = {"math": (steps, math_digits or digits), "code": (steps, digits), "science": (steps, digits),
                  "mental": (mental_steps, 1)}
    out: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for d_i, domain in enumerate(DOMAINS):
        rng = random.Random(seed * 1000 + d_i)
        seen: set[str] = set()
        out[domain] = {}
        for split in ("test", "validation", "train"):  # held-out splits first: they get first pick
            rows, misses = [], 0
            while len(rows) < sizes[split]:
                ex = MAKERS[domain](rng, *difficulty[domain])
                if ex["question"] in seen:
                    misses += 1
                    if misses > 100 * sizes[split]:
                        raise ValueError(f"{domain}: too few distinct questions at (steps, digits) = "
                                         f"{difficulty[domain]}")
                    continue
                seen.add(ex["question"])
                rows.append({
                    "messages": [{"role": "user", "content": ex["question"]},
                                 {"role": "assistant", "content": _assistant(ex["think"], ex["answer_text"])}],
                    "source": f"tinytask/{domain}", "answer": ex["answer"], "tests": ex["tests"],
                })
            out[domain][split] = rows
    return out


def train_tokenizer(texts: list[str], vocab_size: int = 2048):
    """Byte-level BPE with digits split one per token, ChatML specials and think tags."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS + THINK_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None, unk_token=None, additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 4096
    return fast


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")


def build(out: Path, seed: int = 0, steps: int = 2, digits: int = 2, vocab_size: int = 2048,
          math_digits: int | None = 1, mental_steps: int = 2) -> dict[str, str]:
    """Write the task and tokenizer under `out`; return {relative path: sha256} of every file."""
    from jinja2 import Template

    data = generate(seed, steps, digits, math_digits=math_digits, mental_steps=mental_steps)
    render = Template(CHAT_TEMPLATE).render  # train on the rendered chats, so template words get tokens
    train_texts = [render(messages=r["messages"]) for d in DOMAINS for r in data[d]["train"]]
    tokenizer = train_tokenizer(train_texts, vocab_size)
    for d in DOMAINS:
        for split, rows in data[d].items():
            for r in rows:  # Mixture-of-Thoughts carries the token count of each conversation
                text = tokenizer.apply_chat_template(r["messages"], tokenize=False)
                r["num_tokens"] = len(tokenizer(text, add_special_tokens=False)["input_ids"])
            write_jsonl(out / d / f"{split}-00000-of-00001.jsonl", rows)
    tokenizer.save_pretrained(out / "tokenizer")
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Generate the shipped tiny reasoning task and its tokenizer.")
    ap.add_argument("--out", default=str(files("tah.assets").joinpath("tinytask")))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=2, help="operations per math problem (difficulty)")
    ap.add_argument("--digits", type=int, default=2, help="digits per operand (difficulty)")
    ap.add_argument("--math-digits", type=int, default=1, help="digits per math operand (0: as --digits)")
    ap.add_argument("--mental-steps", type=int, default=2, help="operations per mental problem (depth needed)")
    ap.add_argument("--vocab-size", type=int, default=2048)
    args = ap.parse_args(argv)
    hashes = build(Path(args.out), args.seed, args.steps, args.digits, args.vocab_size, args.math_digits,
                   args.mental_steps)
    for path, digest in hashes.items():
        print(f"{digest[:16]}  {path}")


if __name__ == "__main__":
    main()
