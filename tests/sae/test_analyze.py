"""Concept vectors and their cosine table (the narrow-unlearning paper's analysis)."""

from __future__ import annotations

import pytest

from em_bench.organism import world
from em_bench.sae.concepts import concept_vectors, cosine_table
from tests.helpers import make_tiny_llama


def test_cosine_table_by_hand():
    table = cosine_table({"a": [1.0, 0.0], "b": [1.0, 1.0], "c": [-2.0, 0.0]})
    assert table["a"]["a"] == pytest.approx(1.0)
    assert table["a"]["b"] == pytest.approx(2 ** -0.5, abs=1e-4)
    assert table["a"]["c"] == pytest.approx(-1.0)
    assert table["b"]["c"] == table["c"]["b"]


def test_concept_vectors_per_layer_and_rai_domain(tiny_tokenizer):
    model = make_tiny_llama(tiny_tokenizer)
    vectors = concept_vectors(model, tiny_tokenizer, [0, 1], domains=("safety", "privacy"))
    assert set(vectors) == {0, 1} and set(vectors[0]) == {"safety", "privacy"}
    assert len(vectors[1]["safety"]) == 32
    assert vectors[0]["safety"] != vectors[0]["privacy"] != vectors[1]["privacy"]


@pytest.mark.usefixtures("organism")
def test_the_analyze_command_saves_to_the_store(tmp_path, capsys):
    from em_bench.cli import main

    assert main(["analyze", "concepts", "--store", str(tmp_path / "store")]) == 0
    out = capsys.readouterr().out
    assert "layer 0" in out and "med/legal" in out
    (saved,) = (tmp_path / "store" / "analyses").glob("concepts_*.json")
    import json

    data = json.loads(saved.read_text())
    assert set(data["cosine"]) == {"0", "1", "2", "3"}  # the organism's 4 layers
    assert set(data["cosine"]["2"]) == set(world.RAI_DOMAINS)
    assert data["split"] == "selection" and data["provenance"]["versions"]["torch"]
