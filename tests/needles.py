"""Needle prompts for engine tests: the documents of the needle tasks (tasks/lm_eval/kvbench_needle.yaml), in the
tokens kvbench's lm-eval model types feed, and their scorer (the YAML's: the first number equals the key)."""

from __future__ import annotations

from dataclasses import dataclass

from kvbench.tasks.lm_eval.utils import needle
from kvbench.tasks.multiturn import score_turn

STOP = ("\n",)
MAX_NEW_TOKENS = 8  # the YAML's max_gen_toks


@dataclass(frozen=True)
class Needle:
    prompt_ids: tuple[int, ...]
    answer: str


def needles(tokenizer, context_lengths: tuple[int, ...] = (1024,),
            depths: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9), seed: int = 0) -> list[Needle]:
    """Repetitive-filler needles (no varied prose), as the `needle` tasks generate them for the bundled model."""
    docs = needle(context_lengths=list(context_lengths), depths=list(depths), varied_context_lengths=[],
                  seed=seed)["test"]
    return [Needle(tuple(tokenizer(d["prompt"])["input_ids"]), d["answer"]) for d in docs]


def score(prediction: str, sample: Needle) -> float:
    return score_turn(prediction, sample.answer)  # the same rule: the first number in the reply is the key
