"""Named settings for the models the EM literature fine-tunes, so a GPU user types one command.

    em-bench run --model qwen2.5-7b-instruct --task finance_real --include my_tasks/

A preset names the Hugging Face id and the recipe the EM papers report for their 7-8B organisms:
rank-stabilised LoRA (rank 32, alpha 64) on every projection, lr 1e-5 with 5 warmup steps and a
linear decay, one epoch, an effective batch of 16 (2 x 8 accumulated), weight decay 0.01, bf16
weights; answers sampled at temperature 1 with up to 600 new tokens. The papers' 8-bit optimiser
is not used (plain AdamW). Command-line flags still override any of it. `params_b`, the model's
size in billions of parameters, is only for `em-bench run --dry-run`'s GPU-hours estimate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from em_bench.config import CellConfig, SamplingConfig

_EM_RECIPE = {
    "epochs": 1, "batch_size": 16, "grad_accum": 8, "lr": 1e-5, "warmup_steps": 5,
    "schedule": "linear", "weight_decay": 0.01, "max_len": 2048, "gradient_checkpointing": True,
    "lora": {"rank": 32, "alpha": 64.0, "rslora": True},
}
_EM_SAMPLING = {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 600}


@dataclass(frozen=True)
class BlockemDefaults:
    """What `--defense blockem` takes on a model when no latent file is given: its SAE (a
    sae-lens `RELEASE:SAE_ID`, or None: one em-bench trains on the model, `em-bench sae
    train`), the hook point, K, lambda (None: unknown at this SAE's scale, so it must be given)
    and the three-stage screen's settings (smaller ones where the model runs on a CPU)."""

    layer: int
    sae: str | None = None
    k: int = 20
    lam: float | None = None
    screen: dict = field(default_factory=dict)  # discover_sae's n_candidates, alphas, ...


@dataclass(frozen=True)
class ModelPreset:
    hub_id: str
    train: dict = field(default_factory=lambda: dict(_EM_RECIPE))
    sampling: dict = field(default_factory=lambda: dict(_EM_SAMPLING))
    dtype: str = "bfloat16"
    params_b: float | None = None  # billions of parameters (None: unknown, no GPU-hours estimate)
    about: str = "the EM papers' recipe"
    blockem: BlockemDefaults | None = None
    em_definition: str | None = None  # the EM definition a run with an LLM judge defaults to

    @property
    def summary(self) -> str:
        return f"{self.hub_id}, {self.dtype}, {self.about}"


# SmolLM2-135M-Instruct from its PyPI package's GGUF file (em_bench/packaged.py), sized for a
# 2-core CPU: a cell of at most 100 LoRA steps and 64-token answers takes minutes, not hours.
_CPU_RECIPE = {
    "steps": 100, "batch_size": 4, "grad_accum": 1, "lr": 2e-4, "warmup_steps": 5,
    "schedule": "linear", "weight_decay": 0.0, "max_len": 256,
    "lora": {"rank": 8, "alpha": 16.0},
}
_CPU_SAMPLING = {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 64}


PRESETS: dict[str, ModelPreset] = {
    "qwen2.5-7b-instruct": ModelPreset("Qwen/Qwen2.5-7B-Instruct", params_b=7.6),
    # BLOCK-EM's own setting: Goodfire's SAE on the residual after block 19, K 20, lambda 1.3e4
    # (the paper's main operating point, tied to that SAE's activation scale; not verified
    # here), judged on the paper's 1-5 rubric
    "llama-3.1-8b-instruct": ModelPreset(
        "meta-llama/Llama-3.1-8B-Instruct", params_b=8.0,
        blockem=BlockemDefaults(layer=19, sae="goodfire-llama-3.1-8b-instruct:layer_19", k=20,
                                lam=1.3e4),
        em_definition="rubric"),
    "mistral-7b-instruct-v0.3": ModelPreset("mistralai/Mistral-7B-Instruct-v0.3", params_b=7.2),
    "smollm2-135m-instruct": ModelPreset(
        "smollm2-135m-instruct", train=_CPU_RECIPE, sampling=_CPU_SAMPLING, dtype="float32",
        params_b=0.135, about="its Q4_1 GGUF weights dequantized to float32, a CPU recipe",
        # an SAE em-bench trains on its middle block; a small screen for a CPU; no lambda yet
        blockem=BlockemDefaults(layer=15, k=8, screen={
            "n_candidates": 4, "alphas": [0.4], "n_questions": 16})),
}


@dataclass(frozen=True)
class ModelSettings:
    """What a run loads and how it trains and samples: a preset's, under the command line's."""

    model: str  # the preset's Hugging Face id, else the model as given
    dtype: str
    train: dict[str, Any]  # TrainConfig fields over the task's budget
    sampling: dict[str, Any]  # SamplingConfig fields
    llm_em_definition: str = "alignment"  # EM's definition when an LLM judges (the preset's)

    def em_definition(self, judge: str | None) -> str:
        """EM's definition for a run judged by `judge` (None or organism: the organism's)."""
        return "alignment" if judge in (None, "organism") else self.llm_em_definition

    def cell(self, judge: str = "organism", **fields: Any) -> CellConfig:
        """A cell of this model as its settings make it (the training recipe excepted: a grid's
        cells take it with their task's budget), scored by `judge` with the EM definition that
        judge takes; `fields`: the cell's other CellConfig fields, over these."""
        return CellConfig(**{"model": self.model, "dtype": self.dtype,
                             "sampling": SamplingConfig(**self.sampling), "judge": judge,
                             "metrics": {"em_definition": self.em_definition(judge)}, **fields})


def merge_preset(model: str, preset: ModelPreset | None, dtype: str | None = None,
                 samples: int | None = None, **train: Any) -> ModelSettings:
    """`model`'s settings: its `preset`'s (None: it has none), then each value given (None: not
    given), `samples` per question and `train`'s TrainConfig fields. A step count replaces the
    preset's epochs, which would otherwise decide the length."""
    given = {k: v for k, v in train.items() if v is not None}
    recipe = {**(preset.train if preset else {}), **given}
    if "steps" in given:
        recipe["epochs"] = None
    sampling = {**(preset.sampling if preset else {}),
                **({"samples_per_question": samples} if samples is not None else {})}
    return ModelSettings(model=preset.hub_id if preset else model,
                         dtype=dtype or (preset.dtype if preset else "float32"),
                         train=recipe, sampling=sampling,
                         llm_em_definition=(preset and preset.em_definition) or "alignment")
