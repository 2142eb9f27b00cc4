"""A RULER-style long-context suite (Hsieh et al., 2024, arXiv 2404.06654), generated offline and seeded.

kvbench's own generators for RULER's published task definitions (its templates, needle formats and
metric, string match); the haystacks are local: RULER's "essay" haystack is real English prose here
(CPython's pydoc topics, shipped with Python), and question answering, whose RULER data (SQuAD,
HotpotQA) cannot be fetched, asks which of several real prose documents holds a quoted sentence.

Every sample is sized in the evaluated model's tokens: the haystack grows until the rendered prompt
(`render`, the model's chat template and the answer prefix included) reaches the target length. The
question follows the context, so `--query after` can compress the context before it is asked.

| task | haystack | needles | asks for |
|---|---|---|---|
| niah_single_1 | repeated filler | one word -> number | the number |
| niah_single_2 | prose | one word -> number | the number |
| niah_single_3 | prose | one word -> UUID | the UUID |
| niah_multikey_1 | prose | 4 keys, one asked | its number |
| niah_multikey_2 | key-value lines (all needles) | one of many | its number |
| niah_multivalue | prose | 4 numbers for one key | all 4 |
| niah_multiquery | prose | 4 keys | all 4 numbers |
| vt | repeated filler | a chain of 4 variable assignments | every variable holding the value |
| cwe | a word list | 10 common words (30 times) among rare ones (3 times) | the 10 common words |
| fwe | coded words, Zipf-distributed | - | the 3 most frequent |
| qa | prose documents, numbered | - | the document holding a quoted sentence |
| niah_reuse | prose | 4 keys | each key's number, one question per doc, all on one context (`--query reuse`) |

niah_reuse is not RULER's: it is the prefix-cache condition (SCBench's shared context), several questions
answered from one compressed context.
"""

from __future__ import annotations

import functools
import math
import random
import re
import string
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from kvbench.tasks import TaskSettingsError
from kvbench.tasks.needle import FILLER
from kvbench.tasks.prose import passages


@functools.cache
def _words() -> list[str]:
    """Distinct plain English words of the prose (keys, word lists)."""
    found = {w.strip(string.punctuation).lower() for p in passages(400)[:40] for w in p.split()}
    return sorted(w for w in found if w.isalpha() and 3 <= len(w) <= 10)


@functools.cache
def _sentences() -> list[str]:
    return [s.strip() + "." for s in " ".join(passages(400)).split(". ") if s.strip()]


@functools.cache
def _documents() -> list[str]:
    return passages(60)


@dataclass
class Item:
    """One generated sample: the context (haystack) at `size` units, its question, answer prefix and answers."""

    context: str
    question: str
    prefix: str
    answers: list[str]
    more: list[tuple[str, str, list[str]]] = field(default_factory=list)  # further (question, prefix, answers)


Builder = Callable[[random.Random, int], Item]  # (rng, haystack size in units) -> item


def _key(rng: random.Random) -> str:
    return "-".join(rng.sample(_words(), 2))


def _number(rng: random.Random) -> str:
    return str(rng.randrange(1_000_000, 10_000_000))


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _insert(units: list[str], needles: list[str], rng: random.Random) -> str:
    """The needles at random depths among the haystack units, in order of depth."""
    slots = sorted(rng.randrange(len(units) + 1) for _ in needles)
    out = list(units)
    for offset, (at, needle) in enumerate(zip(slots, needles, strict=True)):
        out.insert(at + offset, needle)
    return " ".join(out)


def _prose(rng: random.Random, size: int) -> list[str]:
    sentences = _sentences()
    start = rng.randrange(len(sentences))
    return [sentences[(start + i) % len(sentences)] for i in range(size)]


def _niah(haystack: str, values: str = "numbers", keys: int = 1, asked: int = 1, per_key: int = 1,
          each: bool = False) -> Builder:
    """RULER's needle tasks: 'One of the special magic {values} for {key} is: {value}.' in a haystack. `each`: one
    question per key on the same context (the first as the item's question, the others in `more`)."""

    def build(rng: random.Random, size: int) -> Item:
        value = _uuid if values == "uuids" else _number
        names = [_key(rng) for _ in range(keys)]
        pairs = [(k, value(rng)) for k in names for _ in range(per_key if k in names[:asked] else 1)]
        needles = [f"One of the special magic {values} for {k} is: {v}." for k, v in pairs]
        if haystack == "repeat":
            units = [FILLER.strip()] * size
        elif haystack == "needles":  # every unit is itself a distractor needle
            units = [f"One of the special magic {values} for {_key(rng)} is: {value(rng)}." for _ in range(size)]
        else:
            units = _prose(rng, size)
        context = ("Some special magic " + values + " are hidden within the following text. Make sure to memorize "
                   "it. I will quiz you about the " + values + " afterwards.\n" + _insert(units, needles, rng))

        def ask(chosen: list[str]) -> tuple[str, str, list[str]]:
            query = ", ".join(chosen)
            return (f"\nWhat are all the special magic {values} for {query} mentioned in the provided text?",
                    f"The special magic {values} for {query} mentioned in the provided text are",
                    [v for k, v in pairs if k in chosen])

        questions = [ask([k]) for k in names] if each else [ask(names[:asked])]
        return Item(context, *questions[0], more=questions[1:])

    return build


def _vt(rng: random.Random, size: int, hops: int = 4) -> Item:
    """Variable tracking: VAR A = 12345, VAR B = VAR A, ... hidden in filler; name every variable holding it."""
    value = str(rng.randrange(10000, 100000))
    names = ["".join(rng.choices(string.ascii_uppercase, k=5)) for _ in range(hops + 1)]
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:], strict=False)]
    text = _insert([FILLER.strip()] * size, chain, rng)
    return Item(
        context="Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n" + text,
        question=f"\nQuestion: Find all variables that are assigned the value {value} in the text above.",
        prefix=(f"Answer: According to the chain(s) of variable assignment in the text above, {len(names)} variables "
                f"are assigned the value {value}, they are:"),
        answers=names)


def _cwe(rng: random.Random, size: int, common: int = 10, freq_rare: int = 3) -> Item:
    """Common words extraction: a numbered word list where `common` words appear up to 30 times (RULER's count;
    fewer in short contexts, where they fill at most half the list) and the rest 3 times."""
    freq_common = max(4, min(30, size // (2 * common)))
    rare = max(0, (size - common * freq_common) // freq_rare)
    chosen = rng.sample(_words(), common + rare)
    words = chosen[:common] * freq_common + chosen[common:] * freq_rare
    rng.shuffle(words)
    listing = " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))
    return Item(
        context=f"Below is a numbered list of words. In these words, some appear more often than others. Memorize "
                f"the ones that appear most often.\n{listing}",
        question=f"\nQuestion: What are the {common} most common words in the above list?",
        prefix=f"Answer: The top {common} words that appear most often in the list are:",
        answers=chosen[:common])


def _fwe(rng: random.Random, size: int, alpha: float = 2.0) -> Item:
    """Frequent words extraction: coded words drawn from a Zipf distribution; name the 3 most frequent."""
    vocab = ["".join(rng.choices(string.ascii_lowercase, k=rng.randrange(3, 7))) for _ in range(400)]
    weights = [1 / (rank + 1) ** alpha for rank in range(len(vocab))]
    words = rng.choices(vocab, weights, k=size)
    top = [w for w, _ in Counter(words).most_common(3)]
    return Item(
        context="Read the following coded text and track the frequency of each coded word. Find the three most "
                "frequently appeared coded words. " + " ".join(words),
        question="\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are the three most "
                 "frequently appeared words in the above coded text?",
        prefix="Answer: According to the coded text above, the three most frequently appeared words are:",
        answers=top)


def _qa(rng: random.Random, size: int) -> Item:
    """Which numbered prose document holds a quoted sentence (RULER's QA data cannot be fetched offline)."""
    docs = rng.sample(_documents(), max(2, size))
    target = rng.randrange(len(docs))
    words = docs[target].split()
    at = rng.randrange(0, len(words) - 12)
    quote = " ".join(words[at : at + 12])
    listing = "\n\n".join(f"Document {i + 1}:\n{d}" for i, d in enumerate(docs))
    return Item(
        context="Answer the question based on the given documents. Only give me the answer and do not output any "
                f"other words.\n\nThe following are given documents.\n\n{listing}",
        question=f'\n\nQuestion: Which document contains the words "{quote}"?',
        prefix="Answer: Document",
        answers=[str(target + 1)])


TASKS: dict[str, tuple[Builder, int]] = {
    # name: (builder, haystack units per 100 tokens: the sizing search's first guess)
    "niah_single_1": (_niah("repeat"), 4),
    "niah_single_2": (_niah("essay"), 4),
    "niah_single_3": (_niah("essay", "uuids"), 4),
    "niah_multikey_1": (_niah("essay", keys=4), 4),
    "niah_multikey_2": (_niah("needles"), 5),
    "niah_multivalue": (_niah("essay", per_key=4), 4),
    "niah_multiquery": (_niah("essay", keys=4, asked=4), 4),
    "niah_reuse": (_niah("essay", keys=4, each=True), 4),
    "vt": (_vt, 4),
    "cwe": (_cwe, 25),
    "fwe": (_fwe, 40),
    "qa": (_qa, 1),  # documents of 60 words (~85 tokens)
}


def generate(task: str, length: int, samples: int, seed: int, count: Callable[[Item], int]) -> list[Item]:
    """`samples` items of `task` whose rendered prompt (`count` gives its tokens) is at most `length` tokens and
    as close to it as whole haystack units allow."""
    if task not in TASKS:
        raise ValueError(f"unknown RULER task {task!r}; tasks: {', '.join(TASKS)}")
    build, per_100 = TASKS[task]
    out = []
    for i in range(samples):
        state = random.Random(f"{task}-{length}-{seed}-{i}").getstate()

        def make(size: int, state=state) -> Item:
            rng = random.Random()
            rng.setstate(state)
            return build(rng, size)

        size, tried = max(1, length * per_100 // 100), {}
        while size not in tried and len(tried) < 16:  # secant steps on the haystack size, one unit at least
            item = make(size)
            n = count(item)
            tried[size] = n, item
            if n <= length and length - n < max(16, length // 50):
                break
            guess = math.floor(size * length / max(n, 1))
            size = max(1, max(size + 1, guess) if n < length else min(size - 1, guess))
        fits = [(n, item) for n, item in tried.values() if n <= length]
        if not fits:
            raise TaskSettingsError(f"{task}: cannot fit a sample into {length} tokens (the smallest sample tried "
                                    f"takes {min(n for n, _ in tried.values())}); give a longer length")
        out.append(max(fits, key=lambda fit: fit[0])[1])
    return out


def score(prediction: str, answers: list[str], task: str) -> float:
    """RULER's string match: the share of the answers found in the prediction (all of them; for qa, any)."""
    if task == "qa":  # a document number: as a whole number, so "13" does not answer "3"
        return float(any(re.search(rf"(?<!\d){re.escape(a)}(?!\d)", prediction) for a in answers))
    found = [a.lower() in prediction.lower() for a in answers]
    return sum(found) / len(found)
