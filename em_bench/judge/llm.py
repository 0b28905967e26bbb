"""LLM judges through any OpenAI-compatible API (the `openai` package).

One call per (answer, template): the template's prompt, max_tokens 1, temperature 0 and the
first token's top logprobs, read by judge/scoring.py (or the judge's text when the server
returns no logprobs). Calls run concurrently under a bound; a 429 waits what its Retry-After
says, a 5xx, a timeout or a malformed reply is retried with doubling backoff (no wait runs past
the deadline of the whole batch, `JudgeSettings.deadline`), and an item that still fails is
returned with its error (stored as failed and counted, never dropped). Every verdict is cached
in the store's verdict log (store.VerdictLog) by a hash of (template, its version, judge model,
decoding, question, answer), so a rerun makes no call. The API key comes from the environment
and is never written anywhere.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import asdict, dataclass

from tqdm.auto import tqdm

from em_bench.config import canonical_hash
from em_bench.errors import ConfigError
from em_bench.judge.base import JudgeInput, Judgment
from em_bench.judge.scoring import Verdict, choice_verdict, number_verdict, text_verdict
from em_bench.judge.templates import JudgeTemplate, load_template
from em_bench.metrics import RUBRIC
from em_bench.openai_client import (
    CallFailed,
    async_client,
    call_with_retries,
    chat_completion,
    endpoint,
)
from em_bench.store import VerdictLog

DECODING = {"max_tokens": 1, "temperature": 0, "logprobs": True, "top_logprobs": 20}


@dataclass(frozen=True)
class JudgeSettings:
    """Where and how to call the judge; only `model` and the templates change a verdict."""

    model: str
    base_url: str | None = None
    templates: tuple[str, ...] = ("alignment", "coherence")  # for every answer
    # more templates for some answers, by the suite their JudgeInput's metadata names
    suite_templates: tuple[tuple[str, tuple[str, ...]], ...] = ()
    concurrency: int = 32
    timeout: float = 60.0
    max_attempts: int = 5
    backoff: float = 1.0  # seconds before the second attempt, doubled after each failure
    deadline: float = 600.0  # seconds after judge_many starts that no retry waits past


def verdict_key(template: JudgeTemplate, model: str, question: str, answer: str,
                target: str | None = None) -> str:
    return canonical_hash({"template": template.name, "version": template.version,
                           "judge_model": model, "decoding": DECODING, "question": question,
                           "answer": answer, **({"target": target} if target else {})},
                          length=32)


def read_verdict(template: JudgeTemplate, top_logprobs: dict[str, float] | None,
                 text: str) -> Verdict:
    """The template's scale applied to the judge's first-token logprobs, else to its text."""
    scale, labels = template.scale, tuple(template.labels)
    if scale.kind == "choice":
        if top_logprobs:
            verdict = choice_verdict(top_logprobs, tuple(scale.options))
        else:
            word = text.strip().upper()
            verdict = (Verdict(None, word, 1.0) if word in scale.options
                       else Verdict(None, reason=f"not one of {scale.options}: {text[:40]!r}"))
        if verdict.label is not None and scale.values:  # the option read as a score
            return Verdict(scale.values[verdict.label], mass=verdict.mass)
        return verdict
    low, high = int(scale.min), int(scale.max)
    if top_logprobs:
        return number_verdict(top_logprobs, low, high, labels)
    return text_verdict(text, low, high, labels)


class LLMJudge:
    """Judges answers with an LLM; `judge_many` returns one Judgment per input, in order."""

    def __init__(self, settings: JudgeSettings, cache: VerdictLog | None = None):
        self.settings = settings
        self.templates = [load_template(t) for t in settings.templates]
        self.suite_templates = {suite: [load_template(t) for t in names]
                                for suite, names in settings.suite_templates}
        self.cache = cache
        self.endpoint = endpoint(settings.base_url)
        self.calls = 0  # API calls made (cached verdicts make none)
        versions = "+".join(f"{t.name}.v{t.version}" for t in self.templates)
        extras = "".join(f";{suite}:" + "+".join(f"{t.name}.v{t.version}" for t in ts)
                         for suite, ts in self.suite_templates.items())
        self.name = f"llm:{settings.model}@{versions}{extras}"

    def templates_for(self, item: JudgeInput) -> list[JudgeTemplate]:
        return self.templates + self.suite_templates.get(item.metadata.get("suite"), [])

    def judge_many(self, inputs: list[JudgeInput]) -> list[Judgment]:
        return asyncio.run(self._judge_all(inputs))

    async def _judge_all(self, inputs: list[JudgeInput]) -> list[Judgment]:
        client = async_client(self.settings.base_url, self.settings.timeout)
        bound = asyncio.Semaphore(self.settings.concurrency)
        deadline = time.monotonic() + self.settings.deadline
        with tqdm(total=len(inputs), desc="judge", unit="answer", leave=False) as bar:

            async def judged(x: JudgeInput) -> list[Verdict | str]:
                verdicts = await asyncio.gather(*(self._verdict(client, bound, deadline, t, x)
                                                  for t in self.templates_for(x)))
                bar.update()
                return verdicts

            try:
                verdicts = await asyncio.gather(*(judged(x) for x in inputs))
            finally:
                await client.close()
        return [self._judgment(x, v) for x, v in zip(inputs, verdicts, strict=True)]

    async def _verdict(self, client, bound: asyncio.Semaphore, deadline: float,
                       template: JudgeTemplate, item: JudgeInput) -> Verdict | str:
        """The verdict, or why the call failed for good."""
        target = item.metadata.get("target") if "target" in template.needs else None
        key = verdict_key(template, self.settings.model, item.question, item.answer, target)
        if self.cache is not None and (cached := self.cache.get(key)) is not None:
            return Verdict(**cached)
        prompt = template.render(question=item.question, answer=item.answer,
                                 **({"target": target} if target is not None else {}))

        async def attempt() -> Verdict:
            async with bound:
                self.calls += 1
                reply = await chat_completion(
                    client, model=self.settings.model,
                    messages=[{"role": "user", "content": prompt}], **DECODING)
            choice = reply["choices"][0]
            tokens = (choice.get("logprobs") or {}).get("content")
            top = {t["token"]: t["logprob"] for t in tokens[0]["top_logprobs"]} if tokens \
                else None
            return read_verdict(template, top, choice["message"].get("content") or "")

        try:
            verdict = await call_with_retries(attempt, self.settings.max_attempts,
                                              self.settings.backoff, deadline)
        except CallFailed as e:
            return f"{template.name}: {e}"
        if self.cache is not None:
            self.cache.put(key, asdict(verdict))
        return verdict

    def _judgment(self, item: JudgeInput, verdicts: list[Verdict | str]) -> Judgment:
        # A failed call is an error (counted as judge_error); an unjudgeable verdict is a
        # missing score with its reason in `raw` (counted as unscored), as metrics.py reads them.
        scores, labels, errors, notes = {}, [], [], []
        for template, v in zip(self.templates_for(item), verdicts, strict=True):
            if isinstance(v, str):
                scores[template.name] = None
                errors.append(v)
                continue
            scores[template.name] = v.score
            if v.label is not None:
                labels.append(v.label.lower())
            elif v.score is None:
                notes.append(f"{template.name}: unjudgeable ({v.reason})")
        return Judgment(self.name, item.item_id, scores, label=labels[0] if labels else None,
                        raw="; ".join(notes), error="; ".join(errors) or None)


def make_judge(model: str | None, store=None, definition: str = "alignment") -> LLMJudge:
    """An LLM judge (openai:MODEL) over an OpenAI-compatible API.

    `model` at OPENAI_BASE_URL (key OPENAI_API_KEY), its verdicts cached in `store`'s verdict
    log so a rerun makes no call, no retry waiting past EM_BENCH_JUDGE_DEADLINE seconds. It scores
    misalignment with the EM definition's template (0-100 alignment, or the 1-5 rubric) and
    coherence; refusal on RAI requests and adherence in-domain."""
    if not model:
        raise ConfigError("the openai judge needs a model: openai:MODEL (--judge-model)")
    misalignment = {"alignment": "alignment", "rubric": RUBRIC}[definition]
    deadline = os.environ.get("EM_BENCH_JUDGE_DEADLINE")
    settings = JudgeSettings(model, templates=(misalignment, "coherence"), suite_templates=(
        ("rai", ("refusal",)), ("in_domain", ("adherence",))),
        **({"deadline": float(deadline)} if deadline else {}))
    return LLMJudge(settings, cache=None if store is None else store.verdicts())
