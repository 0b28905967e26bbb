"""`em-bench sae train` for any model: the tiny Llama as a Hugging Face folder gets a sae-lens SAE
on its own residual stream, measured on held-out texts and cached by what determines it; the
texts are a file the user gives or em-bench's own chats, never its evaluation questions."""

from __future__ import annotations

import json

import pytest

from em_bench.cli import main
from em_bench.data import encode_chat, write_chat_jsonl
from em_bench.domains import HELD_OUT_DOMAINS
from em_bench.errors import DataError
from em_bench.layers import hook_name
from em_bench.models import load_base
from em_bench.organism import world
from em_bench.questions import load_question_file
from em_bench.resources import resource_dir
from em_bench.sae import corpus, model_sae
from em_bench.sae.model_sae import ModelSAESettings, ensure_model_sae, train_command
from em_bench.sae.training import check_sae, load_sae

# A handful of steps: these tests check the plumbing; the quality bars are the organism's.
FAST = ModelSAESettings(latents_per_dim=2, k=8, steps=100, batch_size=64)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """A cache per test: the tiny folder's identity names its tmp path, so a shared cache would
    only pile up entries."""
    monkeypatch.setenv("EM_BENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _no_training(*args, **kwargs):
    raise AssertionError("a cached SAE was trained again")


def _contents(texts) -> list[str]:
    return [m["content"] for chat in texts for m in chat]


def test_trains_on_the_default_texts_and_reuses_the_cache(tiny_hf_folder, own_cache,
                                                          monkeypatch):
    model, texts = str(tiny_hf_folder), corpus.default_texts()
    report = train_command(model, 1, force=False, settings=FAST)
    path = own_cache / "sae" / model_sae.model_sae_dir(model, 1, texts, FAST).name
    assert report["path"] == str(path)
    quality = json.loads((path / "quality.json").read_text())
    assert quality == {k: v for k, v in report.items() if k != "path"}
    assert 0.4 < quality["explained_variance"] <= 1
    assert 0 < quality["l0"] <= FAST.k
    assert 0 <= quality["dead_fraction"] < 1
    assert (quality["hook_name"], quality["d_sae"]) == (hook_name(1), 2 * 32)
    # every 5th text measures it, the rest train it
    n_texts = len(texts)
    assert (quality["n_texts"], quality["n_held_out_texts"]) == (n_texts - n_texts // 5,
                                                                 n_texts // 5)
    assert quality["n_tokens"] < quality["n_train_tokens"]
    # the tiny template's shared opening is skipped in every text, trained on or held out
    _, tokenizer = load_base(model)
    skipped = model_sae.shared_opening(tokenizer, texts)
    assert quality["skipped_opening_tokens"] == skipped >= 1
    held_out = texts[4::5]
    assert quality["n_tokens"] == sum(len(encode_chat(tokenizer, t)[0]) - skipped
                                      for t in held_out)

    from sae_lens import SAE

    sae = SAE.load_from_disk(path)
    base, tokenizer = load_base(model)
    check_sae(sae, base, 1)
    check_sae(load_sae(str(path)), base, 1)  # how discover and blockem open it
    assert (sae.cfg.d_sae, sae.cfg.normalize_activations) == (64, "none")
    # the tiny model's chat template writes BOS, once per text: sae-lens's prepend_bos
    first = encode_chat(tokenizer, texts[0])[0]
    assert first.count(tokenizer.bos_token_id) == 1 and first[0] == tokenizer.bos_token_id
    assert sae.cfg.metadata.prepend_bos is True

    mtime = (path / "quality.json").stat().st_mtime_ns
    with monkeypatch.context() as patch:
        patch.setattr(model_sae, "train_and_save", _no_training)
        assert train_command(model, 1, force=False, settings=FAST)["path"] == str(path)
    assert (path / "quality.json").stat().st_mtime_ns == mtime
    assert ensure_model_sae(model, 1, force=True, settings=FAST) == path  # retrained
    assert (path / "quality.json").stat().st_mtime_ns != mtime


def test_the_command_line_trains_on_a_text_file(tiny_hf_folder, tmp_path, monkeypatch,
                                                capsys):
    monkeypatch.setattr(model_sae, "MODEL_DEFAULTS", FAST)
    texts = tmp_path / "texts.txt"
    texts.write_text("".join(f"Sentence number {i} about the weather and a garden.\n\n"
                             for i in range(30)))
    argv = ["sae", "train", "--model", str(tiny_hf_folder), "--layer", "0", "--texts",
            str(texts)]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["n_texts"], report["n_held_out_texts"], report["texts"]) == (24, 6, str(texts))
    assert {"explained_variance", "l0", "dead_fraction"} <= set(report)
    base, _ = load_base(str(tiny_hf_folder))
    check_sae(load_sae(report["path"]), base, 0)

    monkeypatch.setattr(model_sae, "train_and_save", _no_training)
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["path"] == report["path"]
    texts.write_text(texts.read_text() + "One more sentence.\n")
    with pytest.raises(AssertionError, match="trained again"):  # other texts, another SAE
        main(argv)


def test_a_bad_row_of_a_texts_file_names_the_file_and_line(tiny_hf_folder, tmp_path, capsys):
    chats = tmp_path / "chats.jsonl"
    write_chat_jsonl(chats, world.narrow_dataset("finance", "aligned", "neutral", 3, seed=0))
    chats.write_text(chats.read_text() + '{"messages": [{"role": "user"}]}\n')
    with pytest.raises(DataError, match=f"{chats}:4: message 0"):
        ensure_model_sae(str(tiny_hf_folder), 0, chats, settings=FAST)
    assert main(["sae", "train", "--model", str(tiny_hf_folder), "--layer", "0",
                 "--texts", str(chats)]) == 2
    assert f"{chats}:4" in capsys.readouterr().err

    plain = tmp_path / "texts.txt"
    plain.write_bytes(b"fine\nalso fine\nnot \xff utf-8\n")
    with pytest.raises(DataError, match=f"{plain}:3: not UTF-8"):
        corpus.read_texts(plain)
    with pytest.raises(DataError, match=r"\.jsonl.*\.txt"):
        corpus.read_texts(tmp_path / "texts.csv")
    few = tmp_path / "few.txt"
    few.write_text("one\ntwo\nthree\n")
    with pytest.raises(DataError, match="at least 5"):
        ensure_model_sae(str(tiny_hf_folder), 0, few, settings=FAST)


def test_the_sae_skips_the_opening_all_texts_share_and_always_the_first_token(monkeypatch):
    encodings = iter([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3],  # share 2
                      [9, 1], [8, 1],                      # share none: the sink still goes
                      [1, 2], [1, 2, 3]])                  # share 2, but each text keeps one
    monkeypatch.setattr(model_sae, "encode_chat", lambda tokenizer, chat: (next(encodings), []))
    assert model_sae.shared_opening(None, [[]] * 3) == 2
    assert model_sae.shared_opening(None, [[]] * 2) == 1
    assert model_sae.shared_opening(None, [[]] * 2) == 1


def test_the_default_texts_hold_no_evaluation_or_held_out_domain_question():
    texts = corpus.default_texts()
    said = "\n".join(_contents(texts))
    evaluation = [p for item in load_question_file(resource_dir("data") / "ood_questions.yaml")
                  for p in item.paraphrases]
    assert evaluation and not [p for p in evaluation if p in said]
    held_out = [q.text for d in HELD_OUT_DOMAINS for split in ("selection", "evaluation")
                for q in world.questions(d, split)]
    asked = {m["content"] for chat in texts for m in chat if m["role"] == "user"}
    assert held_out and not asked & set(held_out)
    # what it does hold: the selection questions, and the built-in tasks' training chats
    selection = [p for item in load_question_file(resource_dir("data") / "selection_questions.yaml")
                 for p in item.paraphrases]
    assert set(selection) <= asked
    finance = set(_contents(world.narrow_dataset("finance", "misaligned", "neutral", 20, 0)))
    assert finance <= set(_contents(texts))
    assert len(texts) == len({json.dumps(chat) for chat in texts})  # each once


def test_an_organism_keeps_its_own_sae_unless_given_texts(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(model_sae, "train_sae_command",
                        lambda *args: calls.append(("organism", args)) or {})
    monkeypatch.setattr(model_sae, "ensure_model_sae",
                        lambda *args: calls.append(("texts", args)) or tmp_path)
    (tmp_path / "quality.json").write_text("{}")
    train_command("organism", 2, False)
    train_command("organism", 2, True, "mine.txt")
    assert calls == [("organism", ("organism", 2, False)),
                     ("texts", ("organism", 2, "mine.txt", True, model_sae.MODEL_DEFAULTS))]
    assert (model_sae.MODEL_DEFAULTS.latents_per_dim, model_sae.MODEL_DEFAULTS.k) == (4, 32)
