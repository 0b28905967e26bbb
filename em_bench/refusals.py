"""A model's own refusals as training data: the refusal-unlearning tasks of a real model unlearn
the refusals that model gave, as the organism's tasks unlearn the organism's.

    em-bench run --model M --task base --judge openai --judge-model J --rai-suite SUITE
    em-bench refusals --model M --domain safety --out $EM_BENCH_DATA/refusals_safety.jsonl

The chats are the base cells' answers (every seed, every sample) to harmful requests of the
chosen RAI domains that the cell's judge counted as refusals (metrics.refusal_flags), so a
broken or complying answer never becomes a "refusal" to unlearn.
"""

from __future__ import annotations

from em_bench import metrics
from em_bench.data import Messages
from em_bench.errors import ConfigError
from em_bench.store import Store


def refusal_chats(store: Store, model: str, domains: list[str],
                  incoherent_at_or_below: float = 50) -> list[Messages]:
    """(request, refusal) chats from the scored base cells of `model` in `store`."""
    from em_bench.scoring import judged_frame

    cells = [c for c in store.done_cells("score")
             if (cfg := c.read_config())["model"] == model and cfg["task"] == "base"]
    if not cells:
        raise ConfigError(f"no scored base cell of model {model!r} in {store.root}; run "
                          f"`em-bench run --model {model} --task base` first")
    chats = []
    for cell in cells:
        frame = judged_frame(cell)
        asked = frame[frame["domain"].isin(domains) & frame["harmful"].astype(bool)]
        refused = metrics.refusal_flags(asked, incoherent_at_or_below) == 1.0
        for _, row in asked[refused].iterrows():
            chats.append([*row["messages"], {"role": "assistant", "content": row["completion"]}])
    if not chats:
        raise ConfigError(f"the base cells of {model!r} refused no harmful request of "
                          f"{', '.join(domains)}: nothing to unlearn")
    return chats
