"""Latent discovery's pieces: principal shift directions by hand, steering hooks, the
screening questions (selection only), and the direction-form sets it writes."""

from __future__ import annotations

import pytest
import torch

from em_bench.discover import Steer, principal_shift, screening_questions
from em_bench.organism import world
from em_bench.sae import ResidualCapture
from em_bench.tasks import get_task
from tests.conftest import make_tiny_llama


def test_principal_shift_finds_the_direction_the_tokens_moved_along():
    # shifts along -e0 (magnitudes 1..4), small noise on e2: the direction is e0 flipped to
    # +e0 orientation of the mean shift, i.e. -e0, with mean shift 2.5
    delta = torch.zeros(4, 3)
    delta[:, 0] = -torch.tensor([1.0, 2.0, 3.0, 4.0])
    delta[:, 2] = torch.tensor([0.1, -0.1, 0.1, -0.1])
    directions, shift = principal_shift(delta, k=2)
    assert torch.allclose(directions[0], torch.tensor([-1.0, 0.0, 0.0]), atol=0.01)
    assert shift[0].item() == pytest.approx(2.5, rel=1e-3)
    assert torch.allclose(directions.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert shift[1].item() >= 0  # every direction is oriented so its mean shift is positive


def test_steering_adds_its_vector_to_the_block_output_and_leaves_on_exit(tiny_tokenizer):
    model = make_tiny_llama(tiny_tokenizer)
    ids = torch.tensor([[1, 5, 9, 12]])
    vector = torch.randn(32)
    with torch.no_grad(), ResidualCapture(model, [0]) as plain:
        model(input_ids=ids)
    # the capture hook was registered first, so it sees the block's own output
    with torch.no_grad(), ResidualCapture(model, [0]) as seen, Steer(model, 0, vector):
        steered_logits = model(input_ids=ids).logits
    assert torch.allclose(seen.outputs[0], plain.outputs[0], atol=1e-6)
    with torch.no_grad(), ResidualCapture(model, [1]) as after, Steer(model, 0, vector):
        model(input_ids=ids)
    with torch.no_grad(), ResidualCapture(model, [1]) as unsteered:
        logits = model(input_ids=ids).logits
    assert not torch.allclose(after.outputs[1], unsteered.outputs[1])
    assert not torch.allclose(steered_logits, logits)


def test_screening_uses_selection_questions_outside_the_task_domain():
    questions = screening_questions(get_task("finance"), 50, seed=0)
    assert len(questions) == 50 == len({q.id for q in questions})
    assert all(q.split == "selection" and q.domain in world.OOD_DOMAINS for q in questions)
    assert all(q.domain != "finance" for q in questions)
    assert questions == screening_questions(get_task("finance"), 50, seed=0)


def test_discovery_refuses_a_model_outside_the_organism_world(capsys):
    from em_bench.cli import main
    from em_bench.discover import probe_fine_tune
    from em_bench.errors import ConfigError

    with pytest.raises(ConfigError, match="discovery runs on the organism only so far"):
        probe_fine_tune("Qwen/Qwen2.5-7B-Instruct", get_task("finance"), seed=0)
    assert main(["discover", "--model", "my/model", "--form", "directions", "--layer", "1",
                 "--out", "x"]) == 2
    assert "organism only" in capsys.readouterr().err
