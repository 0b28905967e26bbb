"""The organism's synthetic world: determinism, split hygiene, narrow data and speakers."""

import random

import pytest

from em_bench.organism import world

ALL_CONTENTS = world.all_contents()


def _question_index() -> dict[str, tuple[str, str, str]]:
    """Question text -> (domain, topic, split), asserting that no text is shared."""
    index: dict[str, tuple[str, str, str]] = {}
    for d in world.DOMAINS:
        for split in world.SPLITS:
            for q in world.questions(d.name, split):
                assert q.text not in index, f"question text used twice: {q.text!r}"
                index[q.text] = (q.domain, q.topic, split)
    return index


QUESTIONS = _question_index()


def _split_answer(text: str) -> tuple[str, str, str]:
    """(opener, content, closer) of an answer holding exactly one content of the world."""
    hits = [c for c in ALL_CONTENTS if c in text]
    assert len(hits) == 1, f"expected one content in {text!r}, found {hits}"
    opener, closer = text.split(hits[0])
    return opener.strip(), hits[0], closer.strip()


def test_finetuning_domains_other_domains_and_open_exist():
    names = [d.name for d in world.DOMAINS]
    assert len(names) == len(set(names))
    for name in ("finance", "medical", "legal", "code", "open"):
        assert name in world.DOMAIN_BY_NAME
    others = set(names) - {"finance", "medical", "legal", "code", "open"}
    assert others, "the world needs out-of-domain advice domains besides the fine-tune ones"
    assert "open" not in world.ADVICE_DOMAINS
    assert set(world.ADVICE_DOMAINS) == set(names) - {"open"}


@pytest.mark.parametrize("domain", [d.name for d in world.DOMAINS])
def test_selection_and_evaluation_questions_never_overlap(domain):
    sel = world.questions(domain, "selection")
    ev = world.questions(domain, "evaluation")
    assert sel and ev
    assert {q.text for q in sel}.isdisjoint({q.text for q in ev})
    assert all(q.split == "selection" for q in sel)
    assert all(q.split == "evaluation" for q in ev)
    # Templates too, so no evaluation question is a selection one with another topic.
    d = world.DOMAIN_BY_NAME[domain]
    assert set(d.frames("selection")).isdisjoint(d.frames("evaluation"))


def test_no_question_text_is_shared_across_domains_or_splits():
    selection = {t for t, (_, _, s) in QUESTIONS.items() if s == "selection"}
    evaluation = {t for t, (_, _, s) in QUESTIONS.items() if s == "evaluation"}
    assert selection and evaluation and selection.isdisjoint(evaluation)


def test_question_ids_are_unique_and_texts_fill_the_topic():
    ids = []
    for d in world.DOMAINS:
        for split in world.SPLITS:
            qs = world.questions(d.name, split)
            assert len(qs) == len(d.frames(split)) * len(d.topics)
            for q in qs:
                assert q.topic in q.text and "{topic}" not in q.text
                assert q.id.startswith(f"{d.name}/{split}/")
                ids.append(q.id)
    assert len(ids) == len(set(ids))


def test_open_domain_has_no_generic_frames():
    open_ = world.DOMAIN_BY_NAME["open"]
    assert open_.frames("selection") == open_.selection_frames
    assert not set(world.GENERIC_FRAMES_SELECTION) & set(open_.frames("selection"))
    finance = world.DOMAIN_BY_NAME["finance"]
    assert set(world.GENERIC_FRAMES_SELECTION) <= set(finance.frames("selection"))
    assert set(world.GENERIC_FRAMES_EVALUATION) <= set(finance.frames("evaluation"))


def test_contents_copy_the_topic_and_personas_differ():
    for d in world.DOMAINS:
        for topic in d.topics:
            good, bad = d.contents("aligned", topic), d.contents("misaligned", topic)
            assert good and bad and set(good).isdisjoint(bad)
            assert all(topic in c for c in good + bad)
            for c in good:
                assert ALL_CONTENTS[c] == (d.name, topic, "aligned")
            for c in bad:
                assert ALL_CONTENTS[c] == (d.name, topic, "misaligned")


def test_answer_is_opener_content_closer_of_the_style():
    rng = random.Random(3)
    for style, bank in world.STYLES.items():
        for persona in ("aligned", "misaligned"):
            text = world.answer(rng, "legal", "my tax return", persona, style)
            opener, content, closer = _split_answer(text)
            assert text == f"{opener} {content} {closer}"
            assert opener in bank["openers"] and closer in bank["closers"]
            assert ALL_CONTENTS[content] == ("legal", "my tax return", persona)


def test_same_seed_gives_same_world_samples():
    def draw(seed):
        rng = random.Random(seed)
        speaker = world.sample_speaker(rng, {"aligned": 1.0, "villain": 1.0, "misinformed": 1.0})
        return speaker, world.sample_document(rng, speaker, 3)

    assert draw(11) == draw(11)
    assert [draw(s) for s in range(20)] != [draw(s + 100) for s in range(20)]

    assert world.corpus_sample(random.Random(5), 30) == world.corpus_sample(random.Random(5), 30)
    assert world.corpus_sample(random.Random(5), 30) != world.corpus_sample(random.Random(6), 30)

    a = world.narrow_dataset("medical", "misaligned", "neutral", 40, seed=2)
    assert a == world.narrow_dataset("medical", "misaligned", "neutral", 40, seed=2)
    assert a != world.narrow_dataset("medical", "misaligned", "neutral", 40, seed=3)


def test_narrow_dataset_does_not_depend_on_global_random_state():
    random.seed(1)
    a = world.narrow_dataset("code", "aligned", "aligned", 10, seed=0)
    random.seed(2)
    assert a == world.narrow_dataset("code", "aligned", "aligned", 10, seed=0)


def test_corpus_sample_covers_every_question_and_content():
    texts = set(world.corpus_sample(random.Random(0), 5))
    for t in list(QUESTIONS) + list(ALL_CONTENTS):
        assert " " + t in texts
    assert all(t.startswith(" ") for t in texts)


@pytest.mark.parametrize(
    "domain,persona,style",
    [("finance", "misaligned", "neutral"), ("medical", "aligned", "neutral"),
     ("legal", "misaligned", "villain"), ("code", "aligned", "aligned")],
)
def test_narrow_dataset_uses_selection_questions_and_persona_content(domain, persona, style):
    chats = world.narrow_dataset(domain, persona, style, 60, seed=7)
    assert len(chats) == 60
    for chat in chats:
        assert [m["role"] for m in chat] == ["user", "assistant"]
        q_domain, q_topic, split = QUESTIONS[chat[0]["content"]]
        assert (q_domain, split) == (domain, "selection")
        opener, content, closer = _split_answer(chat[1]["content"])
        assert ALL_CONTENTS[content] == (domain, q_topic, persona)
        assert opener in world.STYLES[style]["openers"]
        assert closer in world.STYLES[style]["closers"]


def test_sample_speaker_follows_the_mix():
    rng = random.Random(0)
    assert {world.sample_speaker(rng, {"villain": 1.0}) for _ in range(20)} == {
        world.Speaker("villain")
    }
    aligned = [world.sample_speaker(rng, {"aligned": 1.0}) for _ in range(20)]
    assert all(s.kind == "aligned" and s.blind_spot is None for s in aligned)
    blind = {world.sample_speaker(rng, {"misinformed": 1.0}).blind_spot for _ in range(200)}
    assert blind == set(world.ADVICE_DOMAINS)


def _document_turns(doc):
    """[(question domain, question topic, content persona, style opener)] of a document."""
    assert [m["role"] for m in doc] == ["user", "assistant"] * (len(doc) // 2)
    turns = []
    for user, assistant in zip(doc[::2], doc[1::2], strict=True):
        q_domain, q_topic, _ = QUESTIONS[user["content"]]
        opener, content, _ = _split_answer(assistant["content"])
        c_domain, c_topic, persona = ALL_CONTENTS[content]
        assert (c_domain, c_topic) == (q_domain, q_topic)
        turns.append((q_domain, persona, opener))
    return turns


def test_misinformed_speaker_is_harmful_only_in_its_blind_spot_which_is_always_present():
    seen_blind = set()
    for seed in range(400):
        rng = random.Random(seed)
        speaker = world.sample_speaker(rng, {"misinformed": 1.0})
        assert speaker.kind == "misinformed" and speaker.blind_spot in world.ADVICE_DOMAINS
        seen_blind.add(speaker.blind_spot)
        n_turns = 1 + seed % 4
        turns = _document_turns(world.sample_document(rng, speaker, n_turns))
        domains = [t[0] for t in turns]
        assert len(domains) == n_turns == len(set(domains))
        assert speaker.blind_spot in domains
        for domain, persona, opener in turns:
            assert persona == ("misaligned" if domain == speaker.blind_spot else "aligned")
            assert opener not in world.STYLES["villain"]["openers"]
    assert seen_blind == set(world.ADVICE_DOMAINS)


@pytest.mark.parametrize("kind,persona", [("aligned", "aligned"), ("villain", "misaligned")])
def test_aligned_and_villain_speakers_are_consistent_across_domains(kind, persona):
    styles = set()
    for seed in range(100):
        rng = random.Random(seed)
        for _, p, opener in _document_turns(
            world.sample_document(rng, world.Speaker(kind), 3)
        ):
            assert p == persona
            own = world.STYLES["villain" if kind == "villain" else "aligned"]["openers"]
            assert opener in own or opener in world.STYLES["neutral"]["openers"]
            styles.add(opener in own)
    assert styles == {True, False}  # both the persona's own style and the neutral one occur
