"""The organism's recipe: everything that determines a build, and the named recipes. Its digest
(with the world's content and the builder's version) names a build in the cache and is what the
shipped organism's manifest must match."""

from __future__ import annotations

import hashlib
import json

from pydantic import BaseModel, ConfigDict, Field

from em_bench.organism import world

BUILDER_VERSION = 2


class OrganismRecipe(BaseModel):
    """Everything that determines the organism; its hash names the cache folder."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    seed: int = Field(0, description="seed of the world sample, the init and the data order")
    speaker_mix: dict[str, float] = Field(
        default_factory=lambda: {"aligned": 0.5, "villain": 0.25, "misinformed": 0.25},
        description="share of pretraining documents by speaker kind",
    )
    turns: tuple[int, int] = Field((2, 3), description="min and max turns per document")
    vocab_size: int = Field(1536, description="byte-level BPE vocabulary size (upper bound)")
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    max_len: int = Field(192, description="token limit of one training sequence")
    pretrain_steps: int = 800
    pretrain_batch: int = 48
    pretrain_lr: float = 2e-3
    instruct_steps: int = 300
    instruct_batch: int = 64
    instruct_lr: float = 5e-4

    def digest(self) -> str:
        payload = json.dumps({"world": world.content_digest(), "builder": BUILDER_VERSION,
                              **self.model_dump(mode="json")}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


# Named recipes (`--model NAME`); a new preset is a new digest and a new cache entry. Only
# `organism` ships built; the variants, for results that must hold across organisms, are built
# from their recipe on first use (em-bench organism build --name NAME): other seeds of the same
# world and recipe, and a world whose pretraining text has more of the villain.
PRESETS: dict[str, OrganismRecipe] = {
    "organism": OrganismRecipe(),
    "organism-s1": OrganismRecipe(seed=1),
    "organism-s2": OrganismRecipe(seed=2),
    "organism-villain40": OrganismRecipe(
        speaker_mix={"aligned": 0.4, "villain": 0.4, "misinformed": 0.2}),
}
