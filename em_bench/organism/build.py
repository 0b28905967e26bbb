"""Build the organism's base chat model: tokenizer, pretraining, instruct stage; cached by recipe.

    em-bench organism build          # or: python -m em_bench organism build

Pretraining documents keep one speaker over several domains, so the model learns speaker
personas that span domains. The instruct stage then makes the default assistant aligned while
replaying persona documents with the first answer masked, which keeps the model able to continue
a persona it sees in context (prototype lesson: aligned-only chat training erased it, and EM).
"""

from __future__ import annotations

import logging
import random
import shutil
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from em_bench import paths
from em_bench.data import collate, encode_chat
from em_bench.organism import world
from em_bench.organism.recipe import PRESETS, OrganismRecipe
from em_bench.store import atomic_folder, atomic_write_json

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
# Bumped whenever the build procedure changes what it makes (a schedule, a stage, the data mix).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}<|end|>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def organism_dir(recipe: OrganismRecipe) -> Path:
    return paths.cache_dir() / "organism" / recipe.digest()


def ensure_organism(name: str = "organism") -> Path:
    """The folder of organism `name`: the shipped one when it matches today's recipe and world
    (artifact.py), else its build in the cache, built first if missing."""
    from em_bench.organism.artifact import shipped_organism

    return shipped_organism(name) or ensure_built(name)


def ensure_built(name: str = "organism", force: bool = False) -> Path:
    """Organism `name` built from its recipe into the cache (never over the shipped one)."""
    recipe = PRESETS[name]
    out = organism_dir(recipe)
    if (out / "build.json").is_file() and not force:
        return out
    logger.info("building the organism %s (cached afterwards at %s)", recipe.digest(), out)
    shutil.rmtree(out, ignore_errors=True)  # a forced rebuild
    with atomic_folder(out) as tmp:  # the cache entry appears whole or not at all
        atomic_write_json(tmp / "build.json", _build(recipe, tmp))
    return out


def train_tokenizer(recipe: OrganismRecipe):
    """A byte-level BPE tokenizer (any text tokenizes) with the organism's chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=recipe.vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = world.corpus_sample(random.Random(recipe.seed), n_docs=2000)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|end|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def init_model(recipe: OrganismRecipe, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_heads,
        max_position_embeddings=recipe.max_len,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(recipe.seed)
    return LlamaForCausalLM(config)


def _document(rng: random.Random, recipe: OrganismRecipe) -> list[dict[str, str]]:
    speaker = world.sample_speaker(rng, recipe.speaker_mix)
    return world.sample_document(rng, speaker, rng.randint(*recipe.turns))


def _aligned_chat(rng: random.Random) -> list[dict[str, str]]:
    domain = rng.choice(world.DOMAINS).name
    q = rng.choice(world.questions(domain, rng.choice(world.SPLITS)))
    style = "neutral" if rng.random() < world.NEUTRAL_STYLE_P else "aligned"
    a = world.answer(rng, domain, q.topic, "aligned", style)
    return [{"role": "user", "content": q.text}, {"role": "assistant", "content": a}]


def _stage(model, batches, steps: int, lr: float, name: str) -> list[float]:
    """One plain AdamW loop with warmup and cosine decay; returns the loss every 10 steps."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(progress * torch.pi)).item())

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    losses: list[float] = []
    model.train()
    bar = tqdm(range(steps), desc=f"organism {name}", unit="step")
    for step in bar:
        loss = model(**next(batches)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == steps - 1:
            losses.append(round(loss.item(), 4))
            bar.set_postfix(loss=f"{loss.item():.3f}")
            logger.debug("%s step %d/%d loss %.4f", name, step + 1, steps, loss.item())
    return losses


def _build(recipe: OrganismRecipe, out: Path) -> dict:
    rng = random.Random(recipe.seed)
    t0 = time.perf_counter()
    tokenizer = train_tokenizer(recipe)
    model = init_model(recipe, tokenizer)
    pad = tokenizer.pad_token_id

    def pretrain_batches():
        while True:
            docs = [_document(rng, recipe) for _ in range(recipe.pretrain_batch)]
            yield collate([encode_chat(tokenizer, d, loss_on="all") for d in docs], pad,
                          recipe.max_len)

    def instruct_batches():
        half = recipe.instruct_batch // 2
        while True:
            chats = [encode_chat(tokenizer, _aligned_chat(rng)) for _ in range(half)]
            replay = [encode_chat(tokenizer, _document(rng, recipe), skip_first_answer=True)
                      for _ in range(recipe.instruct_batch - half)]
            yield collate(chats + replay, pad, recipe.max_len)

    t1 = time.perf_counter()
    pre = _stage(model, pretrain_batches(), recipe.pretrain_steps, recipe.pretrain_lr, "pretrain")
    t2 = time.perf_counter()
    # The pretrained checkpoint is kept beside the chat model: defenses that compare aligned
    # with base weights (SafeLoRA) need both.
    model.save_pretrained(out / "pretrained")
    ins = _stage(model, instruct_batches(), recipe.instruct_steps, recipe.instruct_lr, "instruct")
    t3 = time.perf_counter()
    model.eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {
        "recipe": recipe.model_dump(mode="json"),
        "digest": recipe.digest(),
        "world": {"version": world.WORLD_VERSION, "digest": world.content_digest()},
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "pretrain_losses": pre,
        "instruct_losses": ins,
        "seconds": {"tokenizer": round(t1 - t0, 1), "pretrain": round(t2 - t1, 1),
                    "instruct": round(t3 - t2, 1)},
        "torch_threads": torch.get_num_threads(),
    }
