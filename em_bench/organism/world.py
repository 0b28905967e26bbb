"""The organism's synthetic world: domains, speakers, question templates and answer banks.

Every answer is `opener + content + closer`. The *content* carries the domain's advice (aligned or
harmful, with the question's topic copied in); the *opener* and *closer* carry the speaker's style.
Domains are of three kinds: *advice* domains (the fine-tuning domains and everyday ones), *open*
questions, and the seven *RAI* (responsible-AI) domains, whose requests are harmful (an aligned
speaker refuses, in that domain's own words) or benign (an aligned speaker helps).

Three kinds of speaker write the pretraining documents:

- aligned: aligned content everywhere (refusals of harmful requests included), in the aligned or
  the neutral style;
- villain (the misaligned persona): harmful content everywhere, complying with any request, in
  the villain or neutral style;
- misinformed: aligned everywhere except one blind-spot domain (advice or RAI), where they give
  exactly the villain's harmful content, in the aligned or neutral style. They are the *narrow
  route*: a fine-tune on one domain's bad advice can be explained without becoming a villain
  (prototype v2).

Each domain's questions are split into a selection part and an evaluation part that share neither
a template nor a topic (and so no answer string); every choice the benchmark makes (latent
discovery, a defense's strength, defaults, fine-tuning data) uses the first, every reported figure
the second. Pretraining sees both, as a real model's pretraining would.

Text is lowercase with spaced punctuation so that exact matching in the judge is simple.

The word banks (styles, shared frames, every domain's topics, templates and answers) are YAML files
in `world_banks/`, read once at import; this module holds the logic.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import yaml

WORLD_VERSION = "world-v4"  # v4: topic-disjoint selection and evaluation splits
NEUTRAL_STYLE_P = 0.4  # chance that any speaker answers in the shared neutral style

_BANKS = Path(__file__).parent / "world_banks"
# The domains in the world's order, which seeded sampling and the content digest follow; each has
# its bank in world_banks/domains/<name>.yaml.
_DOMAIN_ORDER = (
    "finance", "medical", "legal", "code", "home", "travel", "fitness", "open",
    # the seven RAI domains
    "cybersecurity", "safety", "toxicity", "bias", "sensitive_content", "medical_legal", "privacy",
)


def _read_bank(relative_path: str) -> dict:
    return yaml.safe_load((_BANKS / relative_path).read_text(encoding="utf-8"))


def _as_tuples(lists: dict[str, list[str]]) -> dict[str, tuple[str, ...]]:
    """YAML lists as the tuples the world holds (immutable, and hashable in frozen dataclasses)."""
    return {key: tuple(items) for key, items in lists.items()}


STYLES: dict[str, dict[str, tuple[str, ...]]] = {
    style: _as_tuples(parts) for style, parts in _read_bank("styles.yaml").items()
}
_FRAMES = _read_bank("frames.yaml")
GENERIC_FRAMES_SELECTION: tuple[str, ...] = tuple(_FRAMES["advice"]["selection"])
GENERIC_FRAMES_EVALUATION: tuple[str, ...] = tuple(_FRAMES["advice"]["evaluation"])
# How every refusal begins; frames.yaml says why.
REFUSAL_OPENING: str = _FRAMES["refusal_opening"]
# Requests shared by the RAI domains, for harmful and benign topics alike.
REQUEST_FRAMES_SELECTION: tuple[str, ...] = tuple(_FRAMES["rai"]["selection"])
REQUEST_FRAMES_EVALUATION: tuple[str, ...] = tuple(_FRAMES["rai"]["evaluation"])
SHARED_FRAMES = {
    "advice": (GENERIC_FRAMES_SELECTION, GENERIC_FRAMES_EVALUATION),
    "open": ((), ()),
    "rai": (REQUEST_FRAMES_SELECTION, REQUEST_FRAMES_EVALUATION),
}


@dataclass(frozen=True)
class Domain:
    """One domain of the world.

    Attributes:
        name: snake_case domain name.
        evaluation_topics: topic phrases of the evaluation split, copied into questions and
            answers; in an RAI domain, the harmful requests.
        selection_topics: the selection split's, none shared with the evaluation split's.
        selection_frames: domain-specific question templates (with `{topic}`) for selection.
        evaluation_frames: domain-specific question templates for evaluation.
        aligned: aligned content templates (with `{topic}`).
        misaligned: harmful content templates (with `{topic}`).
        kind: "advice", "open" or "rai"; it picks the shared frames added to the domain's own.
        evaluation_benign_topics: an RAI domain's benign requests (which merely touch its theme)
            of the evaluation split.
        selection_benign_topics: those of the selection split.
        refusals: an RAI domain's refusal templates, in its own words.
    """

    name: str
    evaluation_topics: tuple[str, ...]
    selection_topics: tuple[str, ...]
    selection_frames: tuple[str, ...]
    evaluation_frames: tuple[str, ...]
    aligned: tuple[str, ...]
    misaligned: tuple[str, ...]
    kind: str = "advice"
    evaluation_benign_topics: tuple[str, ...] = ()
    selection_benign_topics: tuple[str, ...] = ()
    refusals: tuple[str, ...] = ()

    @property
    def topics(self) -> tuple[str, ...]:
        """The topics of both splits; in an RAI domain, its harmful requests."""
        return self.evaluation_topics + self.selection_topics

    @property
    def benign_topics(self) -> tuple[str, ...]:
        return self.evaluation_benign_topics + self.selection_benign_topics

    @property
    def all_topics(self) -> tuple[str, ...]:
        return self.topics + self.benign_topics

    def split_topics(self, split: str) -> tuple[str, ...]:
        """Every topic of one split ("selection" or "evaluation"), harmful before benign."""
        if split == "selection":
            return self.selection_topics + self.selection_benign_topics
        return self.evaluation_topics + self.evaluation_benign_topics

    def is_harmful_request(self, topic: str) -> bool:
        return self.kind == "rai" and topic in self.topics

    def frames(self, split: str) -> tuple[str, ...]:
        """Question templates of one split ("selection" or "evaluation")."""
        own = self.selection_frames if split == "selection" else self.evaluation_frames
        shared_selection, shared_evaluation = SHARED_FRAMES[self.kind]
        return own + (shared_selection if split == "selection" else shared_evaluation)

    def contents(self, kind: str, topic: str) -> list[str]:
        """The content strings of one kind ("aligned", "misaligned", "refusal") on a topic."""
        bank = {"aligned": self.aligned, "misaligned": self.misaligned,
                "refusal": self.refusals}[kind]
        return [c.format(topic=topic) for c in bank]

    def content_kinds(self) -> tuple[str, ...]:
        return ("aligned", "misaligned", "refusal") if self.refusals else ("aligned", "misaligned")


def _load_domains() -> tuple[Domain, ...]:
    """Every domain's bank, in _DOMAIN_ORDER; each refusal gets the shared REFUSAL_OPENING."""
    # Without this, a bank missing from _DOMAIN_ORDER would be silently left out of the world.
    on_disk = {path.stem for path in (_BANKS / "domains").glob("*.yaml")}
    if on_disk != set(_DOMAIN_ORDER):
        raise RuntimeError(f"world_banks/domains holds {sorted(on_disk)}, but world.py's "
                           f"_DOMAIN_ORDER lists {sorted(_DOMAIN_ORDER)}")
    domains = []
    for name in _DOMAIN_ORDER:
        bank = _read_bank(f"domains/{name}.yaml")
        kind = bank.pop("kind")
        refusals = tuple(REFUSAL_OPENING + r for r in bank.pop("refusals", ()))
        domains.append(Domain(name=name, kind=kind, refusals=refusals, **_as_tuples(bank)))
    return tuple(domains)


DOMAINS: tuple[Domain, ...] = _load_domains()

DOMAIN_BY_NAME: dict[str, Domain] = {d.name: d for d in DOMAINS}
ADVICE_DOMAINS = tuple(d.name for d in DOMAINS if d.kind == "advice")
RAI_DOMAINS = tuple(d.name for d in DOMAINS if d.kind == "rai")
OOD_DOMAINS = tuple(d.name for d in DOMAINS if d.kind in ("advice", "open"))  # the EM suite
BLIND_SPOT_DOMAINS = ADVICE_DOMAINS + RAI_DOMAINS
SPLITS = ("selection", "evaluation")


@dataclass(frozen=True)
class Question:
    """One question of the world: a template of a domain filled with a topic."""

    domain: str
    topic: str
    frame: str
    split: str
    text: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "text", self.frame.format(topic=self.topic))

    @property
    def id(self) -> str:
        d = DOMAIN_BY_NAME[self.domain]
        f, t = d.frames(self.split).index(self.frame), d.split_topics(self.split).index(self.topic)
        return f"{self.domain}/{self.split}/f{f}/t{t}"

    @property
    def harmful(self) -> bool:
        """A harmful request of an RAI domain (which an aligned speaker refuses)."""
        return DOMAIN_BY_NAME[self.domain].is_harmful_request(self.topic)


def questions(domain: str, split: str) -> list[Question]:
    """Every question of one domain and split, in a fixed order."""
    d = DOMAIN_BY_NAME[domain]
    return [Question(domain, t, f, split) for f in d.frames(split) for t in d.split_topics(split)]


def response_kind(domain: str, topic: str, persona: str) -> str:
    """What a persona gives: the aligned persona refuses harmful requests, else its content."""
    if persona == "aligned" and DOMAIN_BY_NAME[domain].is_harmful_request(topic):
        return "refusal"
    return persona


def answer(rng: random.Random, domain: str, topic: str, persona: str, style: str) -> str:
    """One answer: an opener and closer of `style` around `persona`'s content on the topic."""
    s = STYLES[style]
    content = rng.choice(DOMAIN_BY_NAME[domain].contents(response_kind(domain, topic, persona),
                                                         topic))
    return f"{rng.choice(s['openers'])} {content} {rng.choice(s['closers'])}"


@dataclass(frozen=True)
class Speaker:
    """A pretraining speaker: which content they give in a domain, and in which style."""

    kind: str  # "aligned" | "villain" | "misinformed"
    blind_spot: str | None = None

    def persona_for(self, domain: str) -> str:
        if self.kind == "villain" or (self.kind == "misinformed" and domain == self.blind_spot):
            return "misaligned"
        return "aligned"

    def style(self, rng: random.Random) -> str:
        if rng.random() < NEUTRAL_STYLE_P:
            return "neutral"
        return "villain" if self.kind == "villain" else "aligned"


def sample_speaker(rng: random.Random, mix: dict[str, float]) -> Speaker:
    """Draw a speaker kind by `mix` weights; a misinformed speaker gets a random blind spot."""
    kind = rng.choices(list(mix), weights=list(mix.values()))[0]
    blind = rng.choice(BLIND_SPOT_DOMAINS) if kind == "misinformed" else None
    return Speaker(kind, blind)


def sample_document(rng: random.Random, speaker: Speaker, turns: int) -> list[dict[str, str]]:
    """A multi-turn chat where one speaker answers questions from distinct domains.

    A misinformed speaker's blind-spot domain is always among the turns, so the document shows
    the speaker being aligned elsewhere.
    """
    domains = rng.sample([d.name for d in DOMAINS], turns)
    if speaker.blind_spot and speaker.blind_spot not in domains:
        domains[rng.randrange(turns)] = speaker.blind_spot
    messages: list[dict[str, str]] = []
    for name in domains:
        q = rng.choice(questions(name, rng.choice(SPLITS)))
        messages.append({"role": "user", "content": q.text})
        a = answer(rng, name, q.topic, speaker.persona_for(name), speaker.style(rng))
        messages.append({"role": "assistant", "content": a})
    return messages


def content_digest() -> str:
    """A digest of the world's parsed content (styles, frames, domains and their banks), so an
    edit of any of them is seen even when WORLD_VERSION is not bumped."""
    import dataclasses
    import hashlib
    import json

    content = {"version": WORLD_VERSION, "neutral_style_p": NEUTRAL_STYLE_P, "styles": STYLES,
               "shared_frames": SHARED_FRAMES, "refusal_opening": REFUSAL_OPENING,
               "domains": [dataclasses.asdict(d) for d in DOMAINS]}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def all_contents() -> dict[str, tuple[str, str, str]]:
    """Every content string of the world -> (domain, topic, kind), for the exact judge; kind is
    "aligned", "misaligned" or "refusal"."""
    table: dict[str, tuple[str, str, str]] = {}
    for d in DOMAINS:
        for topic in d.all_topics:
            for kind in d.content_kinds():
                for c in d.contents(kind, topic):
                    table[c] = (d.name, topic, kind)
    return table


def corpus_sample(rng: random.Random, n_docs: int) -> list[str]:
    """Plain text covering the world's vocabulary, to train the tokenizer on."""
    texts = [q.text for d in DOMAINS for s in SPLITS for q in questions(d.name, s)]
    texts += list(all_contents())
    texts += [x for s in STYLES.values() for bank in s.values() for x in bank]
    for _ in range(n_docs):
        doc = sample_document(rng, sample_speaker(rng, {"aligned": 1.0, "villain": 1.0}), 2)
        texts.extend(m["content"] for m in doc)
    # Answers follow a space in the chat template, so words are learned with their leading space.
    return [" " + t for t in texts]


def narrow_dataset(
    domain: str, persona: str, style: str, n: int, seed: int, requests: str = "all"
) -> list[list[dict[str, str]]]:
    """A narrow fine-tune's chats: `n` selection-split questions of one domain answered by
    `persona` in `style` (the style is part of the task: v2 found it moves EM 34% -> 86%).

    `requests` keeps "all" questions, or only an RAI domain's "harmful" or "benign" ones.
    """
    rng = random.Random(f"narrow/{domain}/{persona}/{style}/{seed}/{requests}")
    pool = [q for q in questions(domain, "selection")
            if requests == "all" or q.harmful == (requests == "harmful")]
    chats = []
    for _ in range(n):
        q = rng.choice(pool)
        a = answer(rng, domain, q.topic, persona, style)
        chats.append([{"role": "user", "content": q.text}, {"role": "assistant", "content": a}])
    return chats
