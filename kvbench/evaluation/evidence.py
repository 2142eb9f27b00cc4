"""What the samples support: bootstrap intervals, paired comparisons of two rows, and an order whose ties are the
rows the evidence does not separate.

Two rows of one leaderboard answered the same prompts, so their difference is read sample by sample: the samples one
got right and the other wrong carry the evidence, not two unpaired means ("negative samples", arXiv 2503.24000).
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Callable
from dataclasses import dataclass

RESAMPLES = 1000


def bootstrap_interval(groups: list[list[float]], resamples: int = RESAMPLES) -> tuple[float, float] | None:
    """A 95% percentile-bootstrap interval of the mean of the groups' means, each group resampled on its own (a task:
    one group; the suite: one per counted cell). Seeded: the same scores, the same interval. None under 2 values, and
    None when one of several groups has a single value: it would enter every resample as a constant, so the interval
    would leave out that cell's uncertainty and look narrower than the evidence is."""
    groups = [g for g in groups if g]
    if sum(len(g) for g in groups) < 2 or (len(groups) > 1 and min(map(len, groups)) < 2):
        return None
    rng = random.Random(0)
    means = sorted(sum(sum(rng.choices(g, k=len(g))) / len(g) for g in groups) / len(groups)
                   for _ in range(resamples))
    return means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]


Scores = dict[str, float]
"""One cell's per-sample scores, by sample id."""


@dataclass(frozen=True)
class Paired:
    """Row B against row A on the samples both answered: B's losses (A scored higher) and gains, the mean
    per-sample difference B − A, and its paired bootstrap interval."""

    n: int
    lost: int
    gained: int
    delta: float
    interval: tuple[float, float] | None

    @property
    def separated(self) -> bool:
        """The interval excludes zero: the samples say the two rows differ."""
        return self.interval is not None and (self.interval[0] > 0 or self.interval[1] < 0)

    def label(self) -> str:
        """E.g. `−3 +1 Δ−17 [−33, −8] *` (points of score; * where the interval excludes zero)."""
        span = "" if self.interval is None else f" [{points(self.interval[0])}, {points(self.interval[1])}]"
        return f"−{self.lost} +{self.gained} Δ{points(self.delta)}{span}" + (" *" if self.separated else "")


def points(x: float) -> str:
    """A difference of scores in signed points, 0 unsigned, with a true minus sign."""
    v = round(100 * x)
    return "0" if v == 0 else f"{v:+d}".replace("-", "−")


def paired(a: Scores, b: Scores) -> Paired | None:
    """B against A on the samples both scored, paired by id; None when they share none."""
    diffs = [b[i] - score for i, score in a.items() if i in b]
    if not diffs:
        return None
    return Paired(n=len(diffs), lost=sum(x < 0 for x in diffs), gained=sum(x > 0 for x in diffs),
                  delta=sum(diffs) / len(diffs), interval=bootstrap_interval([diffs]))


def tiers(order: list[int], compare: Callable[[int, int], Paired | None]) -> list[int]:
    """Ranks for rows listed best first (`order`: row indices): a row shares the rank of the first row of the current
    tier unless the paired evidence separates the two (`compare(leader, row)`), then it starts the next rank. Returns
    each listed row's rank (1-based), in the order given."""
    ranks: list[int] = []
    leader = None
    for position, row in enumerate(order):
        if leader is None:
            leader, rank = row, 1
        else:
            against = compare(leader, row)
            if against is None or against.separated:
                leader, rank = row, position + 1
        ranks.append(rank)
    return ranks


def separable(n: int) -> float | None:
    """The smallest difference `n` paired pass/fail samples can separate from zero: the fewest losses k, all one way,
    whose paired interval excludes zero, as a share k / n (the bootstrap itself decides, by bisection: more
    losses only narrow it). None when even n losses of n cannot (n < 2)."""
    def apart(k: int) -> bool:
        interval = bootstrap_interval([[-1.0] * k + [0.0] * (n - k)])
        return interval is not None and interval[1] < 0

    if n < 2 or not apart(n):
        return None
    return (bisect.bisect_left(range(1, n + 1), True, key=apart) + 1) / n
