"""The decode loop, the one every reply goes through: `generate` (one sequence), batched generation (one forward for
several sequences) and `kvbench bench` (several methods in lockstep) differ only in how one step advances the
sequences still running (`one_by_one` or a batched forward)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kvbench.policy import RollsBack

if TYPE_CHECKING:
    from kvbench.runtime.session import Session


@dataclass
class Reply:
    tokens: list[int]
    text: str
    stop_reason: str  # "eos", "stop", "length" ("score" for a scoring pass: nothing generated)
    decode_s: list[float]
    logits: list[torch.Tensor]


class Decoding:
    """One sequence's reply in progress: greedy from the prompt's last `logits` until eos, a stop string or
    `max_new_tokens`. Where the policy asks for it (`RollsBack.take_rollback`), the last generated tokens are undone
    and generated again: their steps stay in the decode time, and at most `max_new_tokens` are regenerated."""

    def __init__(self, session: Session, logits: torch.Tensor, max_new_tokens: int, stop: Sequence[str] = (),
                 ignore_eos: bool = False, return_logits: bool = False) -> None:
        self.session, self.max_new_tokens, self.stop = session, max_new_tokens, tuple(stop)
        self.eos_ids = set() if ignore_eos else session.engine.eos_ids
        self.return_logits = return_logits
        self.tokens = [int(logits.argmax())]
        self.decode_s: list[float] = []
        self.logits = [logits.float().cpu()] if return_logits else []
        self._regenerable = max_new_tokens
        self._rolls_back = isinstance(session.policy, RollsBack)
        # a stop string first appears in the newest token's text, so it is looked for in the last tokens that can
        # hold it (a character is at most 4 bytes, a token at least one; 2 more so that a character split at the
        # window's start cannot hide it): one bounded decode per step, not one of the whole reply
        self._window = 4 * max(map(len, self.stop)) + 2 if self.stop else 0

    @property
    def last(self) -> int:
        """The token to feed next."""
        return self.tokens[-1]

    @property
    def done(self) -> bool:
        if len(self.tokens) >= self.max_new_tokens or self.tokens[-1] in self.eos_ids:
            return True
        if not self.stop:
            return False
        text = self.session.engine.tokenizer.decode(self.tokens[-self._window:], skip_special_tokens=True)
        return any(s in text for s in self.stop)

    def advance(self, token: int, logits: torch.Tensor, seconds: float) -> None:
        """The outcome of feeding `last`: the next greedy token, its logits and the step's seconds."""
        self.decode_s.append(seconds)
        asked = self.session.policy.take_rollback() if self._rolls_back else 0
        back = min(asked, len(self.tokens), self._regenerable)  # fed tokens of this reply
        if back:
            self._regenerable -= back
            self.session.rollback(back)
            del self.tokens[len(self.tokens) - back + 1:]  # keep the first undone token: it is fed again
            del self.logits[len(self.tokens):]
            return
        if self.return_logits:
            self.logits.append(logits.float().cpu())
        self.tokens.append(token)

    def reply(self) -> Reply:
        """The finished reply: eos dropped, text cut at the first stop string; its last token waits to be fed."""
        self.session.pending = [self.tokens[-1]]
        generated, reason = self.tokens, "length"
        if generated[-1] in self.eos_ids:
            generated, reason = generated[:-1], "eos"
        text = self.session.engine.tokenizer.decode(generated, skip_special_tokens=True)
        cuts = [text.index(s) for s in self.stop if s in text]
        if cuts:
            text, reason = text[: min(cuts)], "stop"
        return Reply(generated, text, reason, self.decode_s, self.logits)


Step = Callable[[list[Decoding]], None]
"""Advances every sequence still running by one decode step."""


def one_by_one(live: list[Decoding]) -> None:
    """A step as a forward per sequence, one after another (several methods in lockstep: a slow spell of the
    machine lands on each alike)."""
    for d in live:
        d.advance(*d.session.decode_step(d.last))


def decode(replies: list[Decoding], step: Step = one_by_one) -> list[Reply]:
    """Step the sequences still running until every one is done."""
    live = [d for d in replies if not d.done]
    while live:
        step(live)
        live = [d for d in live if not d.done]
    return [d.reply() for d in replies]
