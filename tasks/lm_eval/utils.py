"""Offline data for kvbench's lm-eval tasks: generated with the same seeded generators as the built-in
tasks and rendered in the evaluated model's own dialect: its tokenizer counts the context lengths and its
chat template wraps the prompt (plain text for a base model without one); lm-eval gets plain strings.
lm-eval calls each generator with the task's `metadata` (YAML, overridden by `--metadata`) as keyword
arguments; `lm_eval` merges `--model_args` into it, so `pretrained=` (and stock `hf`'s `gguf_file=`) name
the evaluated model, and `kvbench compare` passes `pretrained=` itself. `--apply_chat_template` would wrap
these prompts a second time: kvbench's model types refuse it for these tasks."""

from __future__ import annotations

from pathlib import Path

import datasets

from kvbench.runtime import models
from kvbench.tasks import check_window, marks_question
from kvbench.tasks.needle import ANSWER_PREFIX, QUESTION, haystack


def _model(meta: dict) -> str:
    """The evaluated model as kvbench names it (`tokenizer=` or `pretrained=` [+ `gguf_file=`] in the metadata)."""
    name = str(meta.get("tokenizer") or meta.get("pretrained") or models.DEFAULT_MODEL)
    return str(Path(name) / str(meta["gguf_file"])) if meta.get("gguf_file") else name


def _tokenizer(meta: dict):
    return models.load_tokenizer(_model(meta))


def _window(meta: dict) -> int | None:
    """The evaluated model's window (max_position_embeddings), None when its config states none."""
    from transformers import AutoConfig

    return getattr(AutoConfig.from_pretrained(models.local_dir(_model(meta))), "max_position_embeddings", None)


def _chat(tokenizer, user: str, prefix: str = "") -> str:
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                             add_generation_prompt=True) + prefix
    return user + "\n" + prefix


@marks_question
def needle(**meta) -> dict[str, datasets.Dataset]:
    """Simple filler at ~1k/2k/4k and varied prose at ~1k, x depth 0.1..0.9; seeded. Varied prose stops at
    1k by default: with the full cache the 135M model then finds only late needles (2k: 1/5, 4k: 2/5)."""
    tokenizer = _tokenizer(meta)

    def count(user: str) -> int:
        return len(tokenizer(_chat(tokenizer, user, ANSWER_PREFIX))["input_ids"])

    rows = []
    depths = tuple(meta.get("depths", (0.1, 0.3, 0.5, 0.7, 0.9)))
    seed = int(meta.get("seed", 0))
    cells = [("simple", tuple(meta.get("context_lengths", (1024, 2048, 4096)))),
             ("varied", tuple(meta.get("varied_context_lengths", (1024,))))]
    check_window("kvbench_needle", [n for _, lengths in cells for n in lengths], _window(meta), _model(meta))
    for i, (filler, lengths) in enumerate(cells):
        for sample in haystack(tokenizer, lengths, depths, seed + i, (filler,), count,
                               exact=bool(meta.get("exact_lengths", 0))):
            rows.append({"prompt": _chat(tokenizer, sample["user"], ANSWER_PREFIX), "answer": sample["answer"],
                         "context_length": sample["context_length"], "depth": sample["depth"],
                         "filler": sample["filler"], "question": QUESTION})
    return {"test": datasets.Dataset.from_list(rows)}


def ppl(**meta) -> dict[str, datasets.Dataset]:
    """Documents of real English (CPython's pydoc topics, shipped with Python), `words` words each."""
    from kvbench.tasks.prose import passages

    docs = passages(int(meta.get("words", 1200)))[: int(meta.get("documents", 8))]
    return {"test": datasets.Dataset.from_list([{"text": d} for d in docs])}


def rope(**meta) -> dict[str, datasets.Dataset]:
    """Secret-word copying at controlled distances (tokens between the fact and the question)."""
    from kvbench.tasks.rope import ANSWER_PREFIX as ROPE_PREFIX
    from kvbench.tasks.rope import probes

    tokenizer = _tokenizer(meta)
    rows = [{"prompt": _chat(tokenizer, p["user"], ROPE_PREFIX), "answer": p["answer"], "distance": p["distance"]}
            for p in probes(tokenizer, tuple(meta.get("distances", (64, 512, 2048, 6144))),
                            int(meta.get("repeats", 5)), int(meta.get("seed", 0)))]
    return {"test": datasets.Dataset.from_list(rows)}


def longgen(**meta) -> dict[str, datasets.Dataset]:
    """The long-generation prompts, each in the model's chat format."""
    from kvbench.tasks.longgen import PROMPTS

    tokenizer = _tokenizer(meta)
    return {"test": datasets.Dataset.from_list([{"prompt": _chat(tokenizer, p)} for p in PROMPTS])}


def longgen_results(doc: dict, results: list[str]) -> dict[str, float]:
    from kvbench.tasks.longgen import distinct_ngrams

    return {"distinct_4grams": distinct_ngrams(results[0])}


TURN_SEPARATOR = "\n<|kvbench-turn|>\n"  # kvbench_multiturn.yaml passes it as generation_kwargs.turn_separator


def multiturn(**meta) -> dict[str, datasets.Dataset]:
    """Whole conversations (the adapter feeds their turns one by one on one cache); codes to recall per turn."""
    from kvbench.tasks.multiturn import conversations

    talks = conversations(int(meta.get("conversations", 2)), int(meta.get("turns", 24)),
                          int(meta.get("words_per_turn", 260)), int(meta.get("seed", 0)))
    rows = [{"conversation": TURN_SEPARATOR.join(turns), "codes": "|".join(codes)} for turns, codes in talks]
    return {"test": datasets.Dataset.from_list(rows)}


def multiturn_results(doc: dict, results: list[str]) -> dict[str, float]:
    """Per-turn recall of the code, over all turns and over the second half (where positions pass 4k-8k)."""
    from kvbench.tasks.multiturn import score_turn

    codes = doc["codes"].split("|")
    replies = results[0].split("|")
    replies += [""] * (len(codes) - len(replies))  # a conversation cut short scores 0 on the missing turns
    scores = [score_turn(r, c) for r, c in zip(replies, codes, strict=False)]
    late = scores[len(scores) // 2 :]
    return {"turn_acc": sum(scores) / len(scores), "late_turn_acc": sum(late) / len(late)}


def window_probe(**meta) -> dict[str, datasets.Dataset]:
    """Real prose (pydoc topics): `continuation_tokens` to score right after the first `window_end` tokens,
    preceded by `context_tokens` of them. Run with context 8192 (continuation past the 8k window) and 7168
    (inside it): the same continuation, the same text before it, only the positions differ."""
    from kvbench.tasks.prose import passages

    tokenizer = _tokenizer(meta)
    end, context, scored = (int(meta.get(k, d)) for k, d in
                            (("window_end", 8192), ("context_tokens", 8192), ("continuation_tokens", 512)))
    if not 0 < context <= end:
        raise ValueError(f"context_tokens must be in 1..window_end ({end}), got {context}")
    rows = []
    for doc in passages(end + scored)[: int(meta.get("documents", 4))]:  # a word is >= 1 token: long enough
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        rows.append({"context": tokenizer.decode(ids[end - context : end]),
                     "continuation": tokenizer.decode(ids[end : end + scored]), "context_tokens": context})
    return {"test": datasets.Dataset.from_list(rows)}


def window_probe_results(doc: dict, results: list[tuple[float, bool]]) -> dict[str, tuple[float, int]]:
    """Word perplexity of the continuation (lm-eval's weighted perplexity: total log-likelihood over words)."""
    loglikelihood, _ = results[0]
    return {"word_perplexity": (loglikelihood, len(doc["continuation"].split()))}


@marks_question
def ruler(ruler_task: str, **meta) -> dict[str, datasets.Dataset]:
    """One task of the RULER-style suite (kvbench/tasks/ruler.py) at each of `context_lengths` (each must fit the
    evaluated model's window with its answer), `samples` per length, sized in that model's tokens. The doc's
    `question` field marks where the question starts (for `query=after|reuse`); a task with several questions
    per context (niah_reuse) gives one doc per question, the same context in each."""
    from kvbench.tasks import ruler as suite

    tokenizer = _tokenizer(meta)
    lengths = [int(n) for n in meta.get("context_lengths", (1024, 2048, 4096))]
    check_window(f"kvbench_ruler_{ruler_task}", lengths, _window(meta), _model(meta))

    def prompts(item) -> list[tuple[str, str, list[str]]]:
        """(prompt, question, answers) of each of the item's questions."""
        return [(_chat(tokenizer, item.context + q, prefix), q, answers)
                for q, prefix, answers in [(item.question, item.prefix, item.answers), *item.more]]

    def count(item) -> int:  # the longest of its prompts must fit
        return max(len(tokenizer(prompt)["input_ids"]) for prompt, _, _ in prompts(item))

    rows = []
    for length in lengths:
        for i, item in enumerate(suite.generate(ruler_task, length, int(meta.get("samples", 4)),
                                                int(meta.get("seed", 0)), count)):
            for j, (prompt, question, answers) in enumerate(prompts(item)):
                rows.append({"prompt": prompt, "question": question, "answers": answers, "task": ruler_task,
                             "context_length": int(length), "sample": i, "question_index": j})
    return {"test": datasets.Dataset.from_list(rows)}


def ruler_results(doc: dict, results: list[str]) -> dict[str, float]:
    """RULER's string match of the generated answer (`kvbench.tasks.ruler.score`)."""
    from kvbench.tasks.ruler import score

    return {"string_match": score(results[0], doc["answers"], doc["task"])}
