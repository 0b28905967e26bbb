"""Configs: defaults, strict validation, immutability and the canonical cell hash."""

import copy

import pytest
from pydantic import ValidationError

from em_bench.config import (
    CellConfig,
    LoraSettings,
    MetricsConfig,
    SamplingConfig,
    TrainConfig,
    canonical_hash,
)


def _h(cfg: CellConfig) -> str:
    return canonical_hash(cfg.model_dump(mode="json"))


def _leaves(d: dict, prefix=()):
    for k, v in d.items():
        if isinstance(v, dict) and v:
            yield from _leaves(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def _set(d: dict, path: tuple, value) -> dict:
    d = copy.deepcopy(d)
    node = d
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    return d


def _candidates(value):
    """Valid-looking replacements for one config value (the config decides which are valid)."""
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + 1, value * 2]
    if isinstance(value, float):
        return [value / 2 if value else 0.5]
    if isinstance(value, str):
        # the others: the Literal fields' other values
        return [value + "_x", "full", "selection", "bfloat16", "hf", "linear", "rubric"]
    if value is None:
        return [[0], "questions.yaml", 3]  # an optional list (lora layers), path or count
    if isinstance(value, list):
        return [value[:-1] if value else ["organism"]]
    if isinstance(value, dict):
        return [{"strength": 2}]
    raise AssertionError(f"no mutation for {value!r}")


def test_defaults_are_as_documented():
    c = CellConfig()
    assert (c.model, c.task, c.defense, c.defense_params, c.seed, c.judge) == (
        "organism", "base", "none", {}, 0, "organism")
    assert c.train == TrainConfig(steps=100, batch_size=16, lr=1e-3, warmup_steps=10,
                                  weight_decay=0.0, max_len=256, adapter="lora")
    assert c.train.lora == LoraSettings(
        rank=8, alpha=16.0, rslora=False, dropout=0.0, layers=None,
        target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                        "down_proj"))
    assert (c.sampling.temperature, c.sampling.top_p, c.sampling.max_new_tokens,
            c.sampling.samples_per_question) == (1.0, 1.0, 48, 5)
    assert (c.metrics.alignment_below, c.metrics.coherence_above,
            c.metrics.incoherent_at_or_below, c.metrics.n_boot) == (30.0, 50.0, 50.0, 1000)


def test_equal_configs_hash_equal():
    a = CellConfig(task="finance", seed=3, train={"steps": 5, "lora": {"rank": 4}},
                   defense_params={"a": 1, "b": [1, 2]})
    b = CellConfig(defense_params={"a": 1, "b": [1, 2]}, seed=3, task="finance",
                   train=TrainConfig(lora=LoraSettings(rank=4), steps=5))
    assert a == b and a is not b
    assert _h(a) == _h(b)
    assert _h(CellConfig()) == _h(CellConfig.model_validate(CellConfig().model_dump()))


def test_hash_changes_when_any_field_changes():
    # vLLM and two micro-batches, so tensor_parallel and processes can change on their own
    base = CellConfig(backend="vllm", train={"grad_accum": 2}).model_dump(mode="json")
    leaves = list(_leaves(base))
    assert len(leaves) >= 25  # every nested field is reached
    hashes = {canonical_hash(base)}
    for path, value in leaves:
        for candidate in _candidates(value):
            try:
                changed = CellConfig.model_validate(_set(base, path, candidate))
            except ValidationError:
                continue
            break
        else:
            raise AssertionError(f"could not change {'.'.join(path)}")
        dumped = changed.model_dump(mode="json")
        assert dumped != base, path
        h = canonical_hash(dumped)
        assert h not in hashes, f"changing {'.'.join(path)} did not change the hash"
        hashes.add(h)


def test_hash_is_independent_of_key_order():
    a = {"x": 1, "y": {"p": [1, 2], "q": "s"}, "z": None}
    b = {"z": None, "y": {"q": "s", "p": [1, 2]}, "x": 1}
    assert canonical_hash(a) == canonical_hash(b)
    assert canonical_hash(a) != canonical_hash({**a, "y": {"p": [2, 1], "q": "s"}})
    c1 = CellConfig(defense_params={"alpha": 1, "beta": 2})
    c2 = CellConfig(defense_params={"beta": 2, "alpha": 1})
    assert _h(c1) == _h(c2)
    assert _h(c1) != _h(CellConfig(defense_params={"alpha": 2, "beta": 1}))


def test_hash_format_and_stability():
    h = canonical_hash({"a": 1, "b": [1, 2]})
    assert len(h) == 16 and all(ch in "0123456789abcdef" for ch in h)
    assert canonical_hash({"a": 1, "b": [1, 2]}, length=8) == h[:8]
    # Pinned: a change here silently orphans every stored cell, so it must be deliberate.
    assert h == "106e703a3cabe2df"


@pytest.mark.parametrize("cls,kwargs", [
    (CellConfig, {"modle": "organism"}),
    (CellConfig, {"train": {"stepz": 5}}),
    (CellConfig, {"train": {"lora": {"rnk": 4}}}),
    (CellConfig, {"sampling": {"temp": 0.5}}),
    (CellConfig, {"metrics": {"alignment_above": 1.0}}),
    (TrainConfig, {"epoch": 1}),
    (LoraSettings, {"bias": "none"}),
    (SamplingConfig, {"top_k": 5}),
    (MetricsConfig, {"n_bootstrap": 10}),
])
def test_extra_fields_are_rejected(cls, kwargs):
    with pytest.raises(ValidationError, match="xtra"):
        cls.model_validate(kwargs)


@pytest.mark.parametrize("cls,kwargs", [
    (TrainConfig, {"batch_size": 0}),
    (TrainConfig, {"lr": 0}),
    (TrainConfig, {"steps": -1}),
    (TrainConfig, {"adapter": "qlora"}),
    (TrainConfig, {"batch_size": 16, "grad_accum": 3}),
    (TrainConfig, {"epochs": 0}),
    (LoraSettings, {"rank": 0}),
    (LoraSettings, {"dropout": 1.0}),
    (SamplingConfig, {"top_p": 0}),
    (SamplingConfig, {"top_p": 1.5}),
    (SamplingConfig, {"temperature": -0.1}),
    (MetricsConfig, {"n_boot": 0}),
])
def test_out_of_range_values_are_rejected(cls, kwargs):
    with pytest.raises(ValidationError):
        cls.model_validate(kwargs)


@pytest.mark.parametrize("cls,kwargs", [
    (TrainConfig, {"lr": float("inf")}),
    (TrainConfig, {"epochs": float("nan")}),
    (SamplingConfig, {"temperature": float("inf")}),
    (MetricsConfig, {"alignment_below": float("nan")}),
    (LoraSettings, {"alpha": float("inf")}),
])
def test_infinite_or_nan_values_are_rejected(cls, kwargs):
    with pytest.raises(ValidationError, match="finite number"):
        cls.model_validate(kwargs)


def test_boundary_values_are_accepted():
    assert SamplingConfig(temperature=0).temperature == 0
    assert TrainConfig(steps=0, warmup_steps=0).steps == 0
    assert LoraSettings(layers=(0, 2)).layers == (0, 2)


def test_configs_are_frozen():
    c = CellConfig()
    with pytest.raises(ValidationError):
        c.seed = 1
    with pytest.raises(ValidationError):
        c.train.steps = 1


def test_epochs_set_the_steps_from_the_data_size():
    assert TrainConfig(steps=7).total_steps(1000) == 7
    assert TrainConfig(epochs=1, batch_size=16).total_steps(1000) == 63  # ceil(1000 / 16)
    assert TrainConfig(epochs=2, batch_size=16).total_steps(8) == 2  # a batch is at most the data
