"""The selection rule, worked by hand on scripted outcomes: nothing is trained here."""

from __future__ import annotations

import pytest

from em_bench.selection import (
    Outcome,
    admissible,
    bracket_strengths,
    broken,
    pick,
    sweep_strengths,
    tune,
)

NONE = Outcome(em=0.40, in_domain=0.80, incoherent=0.10, seeds=2)


def test_admissible_is_90_percent_of_in_domain_and_3_points_of_incoherence():
    assert admissible(Outcome(0.1, 0.72, 0.13), NONE)  # both exactly at the bar
    assert not admissible(Outcome(0.1, 0.719, 0.10), NONE)
    assert not admissible(Outcome(0.1, 0.80, 0.131), NONE)


def test_broken_is_half_the_in_domain_or_20_points_of_incoherence():
    assert broken(Outcome(0.1, 0.399, 0.10), NONE)
    assert not broken(Outcome(0.1, 0.40, 0.10), NONE)
    assert broken(Outcome(0.1, 0.80, 0.30), NONE)
    assert not broken(Outcome(0.1, 0.80, 0.29), NONE)


def test_strengths_start_at_a_tenth_and_climb_tenfold_then_five_log_spaced():
    assert bracket_strengths(1.0) == [0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0]
    assert bracket_strengths(0.002) == [0.0002, 0.002, 0.02, 0.2, 2.0, 20.0]
    # 0.1 .. 10 in five: ratio 10 ** 0.5 each step, three significant digits
    assert sweep_strengths(0.1, 10.0) == [0.1, 0.316, 1.0, 3.16, 10.0]
    assert sweep_strengths(0.1, 0.1) == [0.1]


def test_the_pick_is_the_lowest_em_among_the_admissible():
    sweep = [(0.1, Outcome(0.30, 0.80, 0.10)), (0.3, Outcome(0.20, 0.75, 0.11)),
             (1.0, Outcome(0.05, 0.70, 0.10)),  # lowest EM, but in-domain < 0.72
             (3.0, Outcome(0.25, 0.79, 0.12))]
    assert pick(sweep, NONE) == (0.3, "lowest EM (20.0%) of the 3 admissible strengths of 4")
    value, reason = pick([(1.0, Outcome(0.05, 0.70, 0.10))], NONE)
    assert value is None and reason.startswith("no admissible strength")


def _defense(break_at: float, calls: list):
    """A scripted defense: EM falls with strength, in-domain collapses at `break_at`."""
    def score(s: float) -> Outcome:
        calls.append(s)
        return Outcome(em=0.40 / (1 + 10 * s), in_domain=0.2 if s >= break_at else 0.80,
                       incoherent=0.10)
    return score


def test_tune_brackets_to_the_first_break_sweeps_below_it_and_scores_each_strength_once():
    calls = []
    selection = tune("kl", "weight", 1.0, NONE, _defense(break_at=10.0, calls=calls))
    assert [s for s, _ in selection.bracket] == [0.1, 1.0, 10.0]  # stops at the first break
    assert selection.upper == 10.0
    assert [s for s, _ in selection.sweep] == [0.1, 0.316, 1.0, 3.16, 10.0]
    assert calls == [0.1, 1.0, 10.0, 0.316, 3.16]  # the bracket's scores are reused
    assert selection.pick == 3.16  # the strongest that is not broken: EM falls with strength
    assert selection.to_dict()["rule"]["admit_in_domain"] == 0.9


def test_tune_without_a_break_sweeps_the_whole_bracket_and_says_so():
    selection = tune("retain", "beta", 1.0, NONE, _defense(break_at=1e9, calls=[]))
    assert selection.upper == 1e4 and "no strength up to 10000 " in selection.upper_reason
    assert [s for s, _ in selection.sweep] == [0.1, 1.78, 31.6, 562.0, 1e4]
    assert selection.pick == 1e4


def test_a_defense_broken_at_its_lowest_strength_has_no_pick():
    selection = tune("blockem", "lambda", 0.002, NONE, _defense(break_at=0.0, calls=[]))
    assert [s for s, _ in selection.sweep] == [0.0002]
    assert selection.pick is None and "no admissible" in selection.reason


@pytest.mark.parametrize("default", [0.002, 1.0, 3.0])
def test_every_swept_strength_lies_between_a_tenth_of_the_default_and_the_upper(default):
    selection = tune("x", "s", default, NONE, _defense(break_at=default * 5, calls=[]))
    strengths = [s for s, _ in selection.sweep]
    assert strengths[0] == pytest.approx(default / 10) and strengths[-1] == selection.upper
    assert strengths == sorted(strengths)


def test_a_bounded_strength_climbs_no_higher_than_its_maximum():
    assert bracket_strengths(0.25, maximum=0.999) == [0.025, 0.25, 0.999]
    assert bracket_strengths(1.0, maximum=1.0) == [0.1, 1.0]
    selection = tune("interleave", "p", 0.25, NONE, _defense(break_at=1e9, calls=[]),
                     maximum=0.999)
    assert selection.upper == 0.999 and max(s for s, _ in selection.sweep) == 0.999
