"""A row says how its strength was set: the stored selection whose pick it runs at."""

from __future__ import annotations

from em_bench.board.chosen import chosen_text
from em_bench.board.pages import tuning_html
from em_bench.defenses import check_defense, defense_card


def _selection(defense, strength, pick, default, fixed=None, model="organism"):
    at = default if pick is None else pick
    params = check_defense(defense, {**(fixed or {}), strength: str(at)}, model)
    return {"defense": defense, "pick": pick, "default": default, "model": model,
            "task": "finance", "seeds": [0, 1], "params": params,
            **({"fixed": fixed} if fixed else {})}


def _row(defense, given, model="organism"):
    return {"defense": defense, "model": model, "card": defense_card(defense),
            "defense_params": check_defense(defense, given, "organism")}


SELECTIONS = [_selection("kl", "weight", 0.1, 1.0), _selection("retain", "beta", None, 1.0),
              _selection("interleave", "p", 0.5, 0.25, fixed={"pick": "perplexity_gap"})]


def test_a_row_at_the_pick_names_the_rule_and_where_it_was_tuned():
    assert chosen_text(_row("kl", {"weight": "0.1"}), SELECTIONS) == \
        "kl: weight=0.1, the rule's pick (finance, seeds 0,1)"
    assert chosen_text(_row("kl", {"weight": "0.1"}, "organism-s1"), SELECTIONS) == \
        "kl: weight=0.1, the rule's pick (finance, seeds 0,1, tuned on organism)"


def test_other_rows_say_they_are_untuned_exempt_or_without_an_admissible_strength():
    assert chosen_text(_row("kl", {"weight": "3"}), SELECTIONS) == "kl: weight=3.0 (not tuned)"
    assert chosen_text(_row("retain", {}), SELECTIONS) == \
        "retain: no admissible beta; run at its default (finance, seeds 0,1)"
    assert chosen_text(_row("inoculation", {}), SELECTIONS) == \
        "inoculation: exempt (no strength to tune)"
    assert chosen_text(_row("none", {}), SELECTIONS) == "-"
    assert chosen_text({**_row("kl", {}), "card": {"family": "loss term"}}, SELECTIONS) == "-"


def test_a_fixed_form_is_matched_only_by_its_own_selection():
    gap = _row("interleave", {"p": "0.5", "pick": "perplexity_gap"})
    plain = _row("interleave", {"p": "0.5"})
    assert chosen_text(gap, SELECTIONS) == \
        "interleave: p=0.5, the rule's pick (finance, seeds 0,1)"
    assert chosen_text(plain, SELECTIONS) == "interleave: p=0.5 (not tuned)"


def test_a_combination_names_each_component():
    row = _row("kl+inoculation", {"kl.weight": "0.1"})
    assert chosen_text(row, SELECTIONS) == ("kl: weight=0.1, the rule's pick (finance, seeds "
                                            "0,1); inoculation: exempt (no strength to tune)")


def test_the_tuning_section_shows_each_sweep_its_pick_and_what_was_not_run():
    outcome = {"em": 0.25, "in_domain": 0.9, "incoherent": 0.04, "seeds": 2}
    swept = {**SELECTIONS[0], "strength": "weight", "sweep": [(0.1, outcome)],
             "reason": "lowest EM (25.0%) of the 1 admissible strengths of 1"}
    why = "the three-stage screen kept no latent at layer 2"
    not_run = {**_selection("blockem", "lambda", None, 0.002, fixed={"form": "sae"}),
               "strength": "lambda", "sweep": [], "not_run": why, "reason": f"not run: {why}"}
    page = tuning_html([not_run, swept])
    assert page.index("blockem form=sae") < page.index("kl")  # sorted by method
    assert "0.1: EM 25.0%, in-domain 90.0%, incoherent 4.0%</td><td>weight=0.1</td>" in page
    assert f"<td>not run</td><td class=\"text\">not run: {why}</td>" in page
    assert tuning_html([]) == ""
