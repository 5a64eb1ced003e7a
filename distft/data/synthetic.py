"""Generated data for the embedded default and for tests: small, learnable, seeded."""
from __future__ import annotations

import random
from typing import List

from distft.data.sources import Record

_POSITIVE = ["great", "wonderful", "delightful", "brilliant", "moving", "funny", "superb", "charming"]
_NEGATIVE = ["dull", "awful", "boring", "clumsy", "tedious", "painful", "bland", "messy"]
_SUBJECTS = ["the film", "this movie", "the plot", "the acting", "the script", "the ending", "the cast"]
_FILLER = ["really", "quite", "at times", "overall", "honestly", "mostly", "in the end"]


_PEOPLE = [["alice"], ["bob", "smith"], ["carol"], ["dan", "lee"], ["erin", "moss"], ["frank"]]
_PLACES = [["paris"], ["new", "york"], ["oslo"], ["cape", "town"], ["lima"], ["rome"]]
_FRAMES = [["{P}", "flew", "to", "{L}", "today"], ["we", "met", "{P}", "in", "{L}"],
           ["{L}", "was", "cold", "said", "{P}"], ["{P}", "likes", "{L}", "a", "lot"], ["nobody", "went", "out"]]


def _entities(rng: random.Random) -> tuple[list, list]:
    """Words and BIO tags: people and places in a few sentence frames."""
    tokens, tags = [], []
    for word in rng.choice(_FRAMES):
        if word in ("{P}", "{L}"):
            name, kind = (rng.choice(_PEOPLE), "person") if word == "{P}" else (rng.choice(_PLACES), "location")
            tokens += name
            tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(name) - 1)
        else:
            tokens.append(word)
            tags.append("O")
    return tokens, tags


def _arith(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 49), rng.randint(0, 49)
    return f"{a} plus {b}", str(a + b)


def generate(task: str, n: int, seed: int, template: str = "alpaca") -> List[Record]:
    rng = random.Random(seed)
    out: List[Record] = []
    for i in range(n):
        if task == "classification":
            label = rng.randint(0, 1)
            word = rng.choice(_POSITIVE if label else _NEGATIVE)
            text = f"{rng.choice(_SUBJECTS)} was {rng.choice(_FILLER)} {word}"
            out.append({"text": text, "label": label})
        elif task == "token_classification":
            tokens, tags = _entities(rng)
            out.append({"tokens": tokens, "tags": tags})
        elif task == "instruction":
            question, answer = _arith(rng)
            if template == "chat":
                out.append({"messages": [{"role": "user", "content": f"Add {question}."},
                                         {"role": "assistant", "content": answer}]})
            else:
                out.append({"instruction": "Add the two numbers.", "input": question, "output": answer})
        else:
            facts = [" is ".join(_arith(rng)) + "." for _ in range(rng.randint(2, 4))]
            out.append({"text": " ".join(facts)})
        out[-1]["_line"] = i + 1
    return out
