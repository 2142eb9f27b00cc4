"""The evidence behind a leaderboard's comparisons: bootstrap intervals, paired differences, tiers."""

from __future__ import annotations

from kvbench.evaluation.evidence import Paired, bootstrap_interval, paired, tiers


def test_an_interval_needs_spread_it_can_resample():
    assert bootstrap_interval([[1.0]]) is None and bootstrap_interval([[0.0, 1.0], [1.0]]) is None
    assert bootstrap_interval([[0.5] * 3, [1.0] * 2]) == (0.75, 0.75)
    assert bootstrap_interval([[0.0, 1.0] * 10]) == bootstrap_interval([[0.0, 1.0] * 10])  # seeded


def test_samples_pair_by_id_and_only_shared_ones_count():
    a = {"1": 1.0, "2": 1.0, "3": 0.0, "only-a": 1.0}
    b = {"3": 1.0, "2": 1.0, "1": 0.0, "only-b": 0.0}
    p = paired(a, b)
    assert p is not None and (p.n, p.lost, p.gained, p.delta) == (3, 1, 1, 0.0) and not p.separated
    assert paired({"1": 1.0}, {"2": 1.0}) is None


def test_losses_all_one_way_are_separated_once_a_loss_free_resample_is_rare():
    """4 losses of 12: a resample draws none with probability (8/12)^12 = 0.8% < 2.5%; 3: 3.2%, not separated."""
    full = {str(i): 1.0 for i in range(12)}
    four = paired(full, {**full, "0": 0.0, "1": 0.0, "2": 0.0, "3": 0.0})
    three = paired(full, {**full, "0": 0.0, "1": 0.0, "2": 0.0})
    assert four is not None and four.separated and four.delta == -4 / 12 and four.label().endswith(" *")
    assert three is not None and not three.separated and three.interval is not None and three.interval[1] == 0


def test_a_tier_ends_where_its_first_row_and_the_next_are_separated():
    def compare(first: int, second: int) -> Paired:
        far = abs(first - second) >= 2
        return Paired(1, 0, 0, 0.0, (-1.0, -0.5) if far else (-1.0, 0.0))

    assert tiers([0, 1, 2, 3, 4], compare) == [1, 1, 3, 3, 5]
    assert tiers([], compare) == []


def test_the_smallest_separable_difference_is_where_a_loss_free_resample_gets_rare():
    """k losses of n, all one way, are separated when fewer than 2.5% of resamples draw none of them:
    (1 − k/n)^n < 0.025. n = 12: k = 4 (0.8%), not 3 (3.2%); n = 100: k = 4 (1.7%), not 3 (4.8%)."""
    from kvbench.evaluation.evidence import separable

    assert separable(12) == 4 / 12 and separable(100) == 0.04
    assert separable(1) is None and separable(2) == 1.0
