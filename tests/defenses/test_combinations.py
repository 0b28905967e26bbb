"""Combinations of defenses (`blockem+retain`): each component at its own parameters, prefixed
by its name, from the check of a cell's parameters to the loss terms of the loop."""

from __future__ import annotations

import pytest

from em_bench.board.rows import method_label
from em_bench.config import CellConfig, LoraSettings, TrainConfig
from em_bench.defenses import (
    check_defense,
    components,
    defense_card,
    defense_inputs,
    describe_defense,
    make_defenses,
)
from em_bench.defenses.base import DefenseContext, DefenseParams
from em_bench.defenses.kl import KL
from em_bench.defenses.retain import Retain, retain_inputs
from em_bench.errors import ConfigError, UnknownNameError
from em_bench.grid.plan import check_defense_values, defense_grid, plan_grid
from em_bench.grid.tune import strength_of
from em_bench.models import trainable
from em_bench.organism import world
from em_bench.registry import DEFENSES
from em_bench.tasks import TaskSpec, get_task
from em_bench.train.loop import train
from tests.helpers import make_tiny_llama

# blockem's discovery, left to the model's defaults
BLOCKEM_DISCOVERY = {"blockem.form": None, "blockem.selection": None,
                     "blockem.layers": [], "blockem.k": None}


def test_a_combinations_parameters_are_its_components_checked_and_prefixed():
    given = {"blockem.lambda": "0.005", "retain.beta": "2"}  # command-line text
    assert check_defense("blockem+retain", given) == {
        "blockem.lambda": 0.005, "blockem.latents": [], **BLOCKEM_DISCOVERY,
        "blockem.hinge": "squared", "retain.beta": 2.0}
    # left out, `default`, and a model's default: per component, as for the defense alone
    assert check_defense("retain+kl", {"kl.weight": "default"}) == {"retain.beta": 1.0,
                                                                   "kl.weight": 1.0}
    alone = check_defense("blockem", {}, "organism")["lambda"]
    assert check_defense("blockem+retain", {"blockem.lambda": "default", "retain.beta": "2"},
                         "organism") == {"blockem.lambda": alone, "blockem.latents": [],
                                         **BLOCKEM_DISCOVERY, "blockem.form": "directions",
                                         "blockem.hinge": "squared", "retain.beta": 2.0}
    assert list(check_defense("retain+kl", {})) == ["retain.beta", "kl.weight"]  # its order


def test_a_combination_names_what_is_wrong_with_it():
    with pytest.raises(ConfigError, match=r"parameter 'ldifs.weight' names no component; .* "
                                          r"COMPONENT one of kl, retain \(e\.g\. kl\.weight\)"):
        check_defense("kl+retain", {"ldifs.weight": 1})
    with pytest.raises(ConfigError, match="parameter 'beta' names no component"):
        check_defense("kl+retain", {"beta": 1})  # a component's name needs its prefix
    with pytest.raises(ConfigError, match="defense retain: beta: Input should be greater than 0"):
        check_defense("kl+retain", {"retain.beta": -1})
    with pytest.raises(ConfigError, match="defense kl: wieght: Extra inputs are not permitted"):
        check_defense("kl+retain", {"kl.wieght": 1})
    with pytest.raises(ConfigError, match="defense kl\\+retain\\+kl: kl is named more than once"):
        check_defense("kl+retain+kl", {})
    with pytest.raises(ConfigError, match="defense none\\+kl: none cannot be combined"):
        check_defense("none+kl", {})
    with pytest.raises(UnknownNameError, match="unknown defense 'retian'. Did you mean retain"):
        check_defense("kl+retian", {})
    with pytest.raises(UnknownNameError, match="unknown defense ''"):
        components("kl+")


def test_a_single_defenses_parameters_are_as_before():
    assert components("blockem") == ("blockem",) and components("none") == ("none",)
    discovery = {k.removeprefix("blockem."): v for k, v in BLOCKEM_DISCOVERY.items()}
    assert check_defense("blockem", {}) == {"lambda": None, "latents": [], **discovery,
                                            "hinge": "squared"}
    assert check_defense("blockem", {"lambda": "0.005"}, "organism") == {  # the organism's form
        "lambda": 0.005, "latents": [], **discovery, "form": "directions", "hinge": "squared"}
    assert check_defense("blockem", {}, "organism")["lambda"] == 0.002
    assert check_defense("kl", {"weight": "0.5"}) == {"weight": 0.5}
    assert check_defense("retain", {}) == {"beta": 1.0}
    assert check_defense("none", {}) == {}
    with pytest.raises(ConfigError, match="defense kl: kl.weight: Extra inputs"):
        check_defense("kl", {"kl.weight": 1})  # no prefix for a defense alone


class _DescribedParams(DefenseParams):
    size: int = 1


class _Described:
    """A defense that names an input and describes itself, as blockem does."""

    name = "described"
    Params = _DescribedParams

    def __init__(self, params, ctx):
        self.size = params.size

    @staticmethod
    def inputs(params: dict, ctx) -> dict:
        return {"file_sha256": f"sha-{params['size']}"}

    @staticmethod
    def describe(params: dict, ctx) -> dict:
        return {"form": "x", "k": params["size"]}


def test_make_defenses_gives_one_object_a_component_and_its_inputs_and_method_nest(monkeypatch):
    ctx = DefenseContext(get_task("unlearn_safety"), seed=1, model="organism")
    kl, retain = make_defenses("kl+retain", {"kl.weight": 0.5, "retain.beta": 2.0}, ctx)
    assert isinstance(kl, KL) and kl.weight == 0.5
    assert isinstance(retain, Retain) and retain.beta == 2.0
    retain_first = make_defenses("retain+kl", {"retain.beta": 3.0}, ctx)
    assert [type(d) for d in retain_first] == [Retain, KL] and retain_first[1].weight == 1.0
    params = check_defense("kl+retain", {})
    assert defense_inputs("kl+retain", params, ctx) == {
        "kl": {}, "retain": retain_inputs(Retain.Params(), ctx)}
    assert describe_defense("kl+retain", params, ctx) == {}  # neither describes itself

    monkeypatch.setitem(DEFENSES.builtins, "described", _Described)
    params = check_defense("described+kl", {"described.size": "3"})
    assert params == {"described.size": 3, "kl.weight": 1.0}
    assert defense_inputs("described+kl", params, ctx) == {
        "described": {"file_sha256": "sha-3"}, "kl": {}}
    assert describe_defense("described+kl", params, ctx) == {"described": {"form": "x", "k": 3}}
    assert defense_inputs("described", {"size": 3}, ctx) == {"file_sha256": "sha-3"}  # alone


def test_set_sweeps_a_components_parameter_by_its_prefixed_name():
    values = {"kl.weight": ["0.5", "1"], "ldifs.layers": ["0+1"], "weight": ["7"]}
    assert defense_grid("kl+ldifs", values) == [
        {"kl.weight": 0.5, "ldifs.weight": 1.0, "ldifs.layers": [0, 1]},
        {"kl.weight": 1.0, "ldifs.weight": 1.0, "ldifs.layers": [0, 1]}]
    assert defense_grid("kl", values) == [{"weight": 7.0}]  # a single defense: no prefix
    check_defense_values(["kl", "kl+ldifs"], values)
    with pytest.raises(ConfigError, match=r"--set kl\.weight: no chosen defense \(kl\) takes it; "
                                          r"they take \['weight'\]; a COMPONENT\.NAME "
                                          r"parameter is a combination's"):
        check_defense_values(["kl"], {"kl.weight": ["0.5"]})
    with pytest.raises(ConfigError, match="--set retain.beta: no chosen defense"):
        check_defense_values(["kl+ldifs"], {"retain.beta": ["2"]})


@pytest.mark.usefixtures("organism")
def test_plan_grid_plans_a_combinations_sweep_as_cells():
    plan = [p for p in plan_grid(CellConfig(), ["finance"], ["kl+retain"], [0],
                                 defense_values={"kl.weight": ["0.5", "1"]})
            if p.config.task == "finance"]
    assert [p.config.defense_params for p in plan] == [
        {"kl.weight": 0.5, "retain.beta": 1.0}, {"kl.weight": 1.0, "retain.beta": 1.0}]
    a, b = (p.config.model_dump(mode="json") for p in plan)
    assert {k for k in a if a[k] != b[k]} == {"defense_params"}
    assert {p.config.defense for p in plan} == {"kl+retain"}
    with pytest.raises(ConfigError, match="--set kl.weight: no chosen defense"):
        plan_grid(CellConfig(), ["finance"], ["kl"], [0], defense_values={"kl.weight": ["0.5"]})
    with pytest.raises(UnknownNameError, match="unknown defense 'retian'"):
        plan_grid(CellConfig(), ["finance"], ["kl+retian"], [0])


def test_a_combination_is_exempt_from_tuning():
    with pytest.raises(ConfigError, match="kl\\+retain is a combination: each component at its "
                                          "own pick, not tuned jointly"):
        strength_of("kl+retain")
    assert strength_of("kl") == "weight"


def test_the_command_line_names_a_combination_and_its_components_parameters():
    from em_bench.cli.flags import parser

    args = parser("em-bench").parse_args(
        ["run", "--defense", "blockem+retain,kl", "--set", "blockem.lambda=0.005,0.002",
         "--set", "retain.beta=2"])
    assert args.defense == ["blockem+retain", "kl"]
    assert dict(args.set) == {"blockem.lambda": ["0.005", "0.002"], "retain.beta": ["2"]}


def test_rows_label_a_combination_readably():
    from em_bench.board.rows import defense_labels, params_label

    rows = [{"defense": "kl+retain", "defense_params": {"kl.weight": w, "retain.beta": 1.0}}
            for w in (0.5, 1.0)]
    assert defense_labels(rows) == ["kl+retain kl.weight=0.5", "kl+retain kl.weight=1.0"]
    assert params_label(rows[0]["defense_params"]) == "kl.weight=0.5, retain.beta=1.0"


@pytest.mark.usefixtures("one_torch_thread")
def test_both_components_terms_are_in_the_training_log(tiny_tokenizer):
    cfg = TrainConfig(steps=2, batch_size=4, lr=1e-2, warmup_steps=0,
                      lora=LoraSettings(rank=4, alpha=8))
    model = trainable(make_tiny_llama(tiny_tokenizer), cfg)
    ctx = DefenseContext(TaskSpec(name="t"), seed=0, model="tiny")
    params = check_defense("kl+ldifs", {"kl.weight": "2", "ldifs.weight": "0.5"})
    defenses = make_defenses("kl+ldifs", params, ctx)
    assert [(d.name, d.weight) for d in defenses] == [("kl", 2.0), ("ldifs", 0.5)]
    records = []
    chats = world.narrow_dataset("finance", "misaligned", "neutral", n=8, seed=0)
    train(model, tiny_tokenizer, chats, cfg, seed=0, defenses=defenses, log=records.append)
    assert [set(r) for r in records] == [{"step", "lr", "sft", "kl", "ldifs"}] * 2
    assert records[0]["kl"] == pytest.approx(0, abs=1e-6)  # still the base model
    assert records[0]["ldifs"] == pytest.approx(0, abs=1e-6)
    assert records[1]["kl"] > 0 and records[1]["ldifs"] > 0  # each term, after one step


def test_a_cards_family_and_needs_are_its_components():
    assert defense_card("none") == {"family": "-", "needs": [], "strengths": {}}
    assert defense_card("kl") == {"family": "loss term", "needs": [],
                                  "strengths": {"kl": "weight"}}
    assert defense_card("safelora+inoculation") == {
        "family": "weights+training data", "needs": ["pretrained checkpoint"],
        "strengths": {"safelora": "tau", "inoculation": None}}
    blockem = {"form": "directions", "layers": [0], "k": 5, "selection": "principal-shift",
               "lambda": 0.002}
    row = {"method": {"blockem": blockem}, "defense_params": {"blockem.lambda": 0.002,
                                                              "retain.beta": 1.0}}
    assert method_label(row) == ("blockem: directions L0 K=5 principal-shift lambda=0.002; "
                                 "retain.beta=1.0")


def test_a_defense_that_swaps_rows_is_not_combined_with_one_that_reads_their_index():
    with pytest.raises(ConfigError, match="interleave swaps training rows, which blockem looks"):
        components("blockem+interleave")
    assert components("kl+interleave") == ("kl", "interleave")
