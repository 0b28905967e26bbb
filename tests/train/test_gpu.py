"""The GPU path (run with `pytest -m gpu` on a CUDA machine): the tiny Llama in bf16 on the GPU,
trained with gradient checkpointing and accumulation, then generating there."""

from __future__ import annotations

import pytest

from em_bench.config import LoraSettings, SamplingConfig, TrainConfig
from em_bench.generate.base import Request
from em_bench.generate.hf import HFBackend
from em_bench.models import default_device, trainable
from em_bench.organism import world
from em_bench.train.loop import train
from tests.helpers import make_tiny_llama

pytestmark = pytest.mark.gpu


def test_bf16_training_with_checkpointing_and_generation_on_the_gpu(tiny_tokenizer):
    import torch

    assert torch.cuda.is_available() and default_device() == "cuda"
    cfg = TrainConfig(steps=3, batch_size=4, grad_accum=2, lr=1e-3, gradient_checkpointing=True,
                      lora=LoraSettings(rank=4, alpha=8, rslora=True))
    model = trainable(make_tiny_llama(tiny_tokenizer).to("cuda", torch.bfloat16), cfg)
    records = []
    chats = world.narrow_dataset("finance", "misaligned", "neutral", n=8, seed=0)
    train(model, tiny_tokenizer, chats, cfg, seed=0, log=records.append)
    assert len(records) == 3 and all(r["sft"] == r["sft"] for r in records)  # no NaN
    assert next(model.parameters()).device.type == "cuda"
    (done,) = HFBackend(model, tiny_tokenizer).generate(
        [Request("k", chats[0][:1])], SamplingConfig(temperature=0, max_new_tokens=5), seed=0)
    assert done.n_tokens >= 1
