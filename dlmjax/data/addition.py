"""The demo's synthetic task: multi-digit addition with a short worked answer, generated deterministically, and a
character-level Hugging Face tokenizer with a chat template (so the demo goes through the same data, checkpoint and
decode paths as a real model).

A record: {"prompt": "457+038", "response": "0010=0495", "answer": "0495"}. Operands are zero-padded to a fixed
width (every digit sits at a fixed column) and the response is a short worked answer: the carry into each column,
then the sum. With the carries written out, every answer token is a function of three visible tokens (two operand
digits and a carry), which a small model learns far faster than the bare sum; the trailing EOS padding is the easy
part the parallel decoders commit early, the carry chain the hard part.
"""

from __future__ import annotations

import json
import os
import random

SPECIALS = ("<|eos|>", "<|mask|>", "<|user|>", "<|assistant|>")
CHARS = tuple("0123456789+=")
CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}"
                 "{% else %}<|assistant|>{{ m['content'] }}<|eos|>{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def make_tokenizer():
    """A PreTrainedTokenizerFast over single characters + 4 special tokens (eos doubles as pad)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<|eos|>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|eos|>", pad_token="<|eos|>",
                                  mask_token="<|mask|>", additional_special_tokens=["<|user|>", "<|assistant|>"])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def problem(rng: random.Random, max_digits: int) -> tuple[int, int]:
    """Two operands uniform in [0, 10^max_digits)."""
    return rng.randrange(10 ** max_digits), rng.randrange(10 ** max_digits)


def carries(a: int, b: int, digits: int) -> str:
    """The carry into each column of the sum, most significant first (d+1 digits; the units column gets 0)."""
    out, c = [], 0
    for _ in range(digits):
        out.append(c)
        c = (a % 10 + b % 10 + c) // 10
        a, b = a // 10, b // 10
    out.append(c)
    return "".join(str(x) for x in reversed(out))


def record(a: int, b: int, digits: int) -> dict:
    q = f"{a:0{digits}d}+{b:0{digits}d}"
    s = f"{a + b:0{digits + 1}d}"
    return {"prompt": q, "response": f"{carries(a, b, digits)}={s}", "answer": s}


def make_splits(n_train: int, n_test: int, max_digits: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Disjoint train / held-out test problems, a function of (sizes, digits, seed) only."""
    rng = random.Random(seed)
    seen, test, train = set(), [], []
    cap = (10 ** max_digits) ** 2
    if n_train + n_test > cap // 2:
        raise ValueError(f"{n_train + n_test} problems requested but only {cap} exist with {max_digits} digits")
    while len(test) < n_test:
        p = problem(rng, max_digits)
        if p not in seen:
            seen.add(p)
            test.append(record(*p, max_digits))
    while len(train) < n_train:
        p = problem(rng, max_digits)
        if p not in seen:
            seen.add(p)
            train.append(record(*p, max_digits))
    return train, test


def write_jsonl(path: str, records: list[dict]):
    tmp = path + ".partial"
    with open(tmp, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def score(text: str, answer: str) -> bool:
    """Exact match of the sum after the last '=' of the completion (whitespace ignored)."""
    text = "".join(text.split())
    return text.rsplit("=", 1)[-1] == answer if "=" in text else text == answer
