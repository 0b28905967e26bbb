"""The transformers backend: batched sampling with a KV cache, LoRA adapter applied by peft."""

from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm

from em_bench.config import SamplingConfig
from em_bench.data import render
from em_bench.generate.base import Completion, Request

logger = logging.getLogger(__name__)


class HFBackend:
    """Generates with `model.generate` on left-padded batches.

    Sampling is seeded per batch from (seed, batch index), so a rerun with the same requests in
    the same order gives the same answers.
    """

    name = "hf"

    def __init__(self, model, tokenizer, batch_size: int = 128):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size

    @torch.inference_mode()
    def generate(self, requests: list[Request], sampling: SamplingConfig,
                 seed: int) -> list[Completion]:
        tok = self.tokenizer
        tok.padding_side = "left"  # generation appends on the right, so prompts align there
        self.model.eval()
        out: list[Completion] = []
        batches = range(0, len(requests), self.batch_size)
        for b, start in enumerate(tqdm(batches, desc="generate", unit="batch", leave=False)):
            chunk = requests[start : start + self.batch_size]
            prompts = [render(tok, r.messages, add_generation_prompt=True) for r in chunk]
            enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            enc = enc.to(self.model.device)
            torch.manual_seed(seed * 100_003 + b)
            greedy = sampling.temperature == 0
            ids = self.model.generate(
                **enc,
                do_sample=not greedy,
                temperature=None if greedy else sampling.temperature,
                top_p=None if greedy else sampling.top_p,
                top_k=None,
                max_new_tokens=sampling.max_new_tokens,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
            new = ids[:, enc["input_ids"].shape[1] :]
            for r, row in zip(chunk, new, strict=True):
                ended = (row == tok.eos_token_id).nonzero()
                # without an end token every generated token is the answer's (padding follows
                # only an end token; counting non-pad tokens would cut an answer in which the
                # model itself emitted the pad token's id)
                n = int(ended[0]) + 1 if len(ended) else len(row)
                text = tok.decode(row[:n], skip_special_tokens=True).strip()
                out.append(Completion(r.key, text, "stop" if len(ended) else "length", n))
        return out


def make_backend(config, model, tokenizer, adapter=None) -> HFBackend:
    """transformers in this process: the cell's model with its adapter applied."""
    return HFBackend(model, tokenizer)
