"""Latent discovery's pieces: principal shift directions by hand, steering hooks, the
screening questions (selection only), and the direction-form sets it writes."""

from __future__ import annotations

import pytest
import torch

from em_bench.organism import world
from em_bench.sae.discover import Steer, principal_shift, screening_questions, selection_prompts
from em_bench.sae.training import ResidualCapture
from em_bench.tasks import get_task
from tests.helpers import make_tiny_llama


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
    prompts = selection_prompts("organism", get_task("finance"))
    selection = {q.id: q for d in world.OOD_DOMAINS for q in world.questions(d, "selection")}
    assert all(p.key in selection and p.domain != "finance" for p in prompts)
    assert {selection[p.key].split for p in prompts} == {"selection"}
    questions = screening_questions(prompts, 50, seed=0)
    assert len(questions) == 50 == len({q.key for q in questions})
    assert questions == screening_questions(prompts, 50, seed=0)


def test_other_models_read_em_benchs_selection_file_never_the_evaluation_one(tmp_path):
    from em_bench.questions import load_question_file
    from em_bench.resources import resource_dir

    prompts = selection_prompts("my/model", get_task("finance"))
    assert len(prompts) == 16 and {p.source for p in prompts} == {"file"}
    evaluation = load_question_file(resource_dir("data") / "ood_questions.yaml")
    asked = {text for i in evaluation for text in i.paraphrases}
    assert not asked & {p.messages[-1]["content"] for p in prompts}
    assert not {i.id for i in evaluation} & {p.question_id for p in prompts}
    mine = tmp_path / "mine.yaml"
    mine.write_text("- id: q\n  paraphrases: [\"What now?\"]\n")
    (only,) = selection_prompts("organism", get_task("finance"), mine)  # a file wins, any model
    assert only.messages == [{"role": "user", "content": "What now?"}]
