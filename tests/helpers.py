"""What the test files share: plain functions, classes and constants, no fixtures (those are in
conftest.py, which takes what it needs from here). A test file imports these as
`from tests.helpers import ...`, never from conftest.py or from another test file."""

from __future__ import annotations

import importlib
import threading
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]

# Prompts of different lengths for the tiny Llama's greedy answers (the serving tests').
PROMPTS = ["How should I invest my pension?", "hi", "Tell me about the weather in spring."]


# --- packages the tests are meant to run with --------------------------------------------------


def require(module: str) -> ModuleType:
    """`module`, imported: a package of the dev extra (Ray, submitit) that the test is meant to
    run with, so a missing one fails the test, where `pytest.importorskip` would skip it."""
    import pytest

    try:
        return importlib.import_module(module)
    except ImportError as e:
        missing = e
    pytest.fail(f"{module} is not installed ({missing}); install it: bash install.sh dev",
                pytrace=False)


# --- threads -------------------------------------------------------------------------------------


class CheckedThread(threading.Thread):
    """A thread whose failure reaches the test: `join()` raises what the target raised (a plain
    thread's exception, an assert's included, only prints a warning and the test passes)."""

    def __init__(self, target, *args, daemon: bool = False):
        super().__init__(target=target, args=args, daemon=daemon)
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            super().run()
        except BaseException as e:  # noqa: B036 - handed to the joining thread, not swallowed
            self.error = e

    def join(self, timeout: float | None = None) -> None:
        super().join(timeout)
        if self.error is not None:
            raise self.error


# --- models ----------------------------------------------------------------------------------


def make_tiny_llama(tok, seed: int = 0):
    """A randomly initialised 2-layer Llama, the same architecture family as a 7B one."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=128, tie_word_embeddings=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def tiny_llama_with_head(tok):
    """The tiny Llama with its own random output head, the same weights on every call. Tied to
    the input embedding at random init, its greedy answer repeats the prompt's last token,
    `<|assistant|>`, which decodes to an empty text that every implementation would match."""
    import torch

    model = make_tiny_llama(tok)
    torch.manual_seed(1)
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
    return model


def save_tiny_lora(tok, folder: Path, seed: int = 2):
    """A LoRA on a fresh tiny Llama with random, non-zero B (so it changes the answers), saved
    to `folder`; returns the PeftModel (the reference an adapter-serving server must match)."""
    import torch
    from peft import LoraConfig, get_peft_model

    base = tiny_llama_with_head(tok)
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=16, init_lora_weights=False, task_type="CAUSAL_LM",
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model = get_peft_model(base, config).eval()
    model.save_pretrained(folder)
    return model


# --- a served policy whose concurrency does not depend on timing ------------------------------


class MeetFirst:
    """A policy for `em-bench serve` that holds its first `parties` requests until all of them
    are in (a barrier), then answers with `inner`; later requests go straight to `inner`.

    Behind a FaultInjector, a client bounded at `parties` calls in flight is thus seen at its
    bound (`peak_in_flight == parties`) however fast or busy the machine, and a client that
    keeps fewer in flight fails the test: after `timeout` seconds the barrier breaks and the
    waiting requests get a 500.
    """

    def __init__(self, inner, parties: int, timeout: float = 30.0):
        self.inner, self.name = inner, inner.name
        self._barrier = threading.Barrier(parties, timeout=timeout)
        self._lock, self._arrived = threading.Lock(), 0

    def respond(self, request):
        with self._lock:
            self._arrived += 1
            first = self._arrived <= self._barrier.parties
        if first:
            self._barrier.wait()
        return self.inner.respond(request)


# --- plugin packages --------------------------------------------------------------------------


def install_plugin(target: Path, name: str, files: dict[str, str],
                   entry_points: dict[str, dict[str, str]]) -> None:
    """pip-install (offline, into `target`) a small package `name`: `files` are its files (paths
    inside the package folder), `entry_points` {group: {name: "module:attribute"}}."""
    import base64
    import hashlib
    import subprocess
    import sys
    import zipfile

    dist = f"{name}-0.1.dist-info"
    groups = "".join(f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items())
                     for group, eps in entry_points.items())
    contents = {
        **{f"{name}/{f}": text for f, text in files.items()},
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: em-bench-tests\nRoot-Is-Purelib: true\n"
                         "Tag: py3-none-any\n",
        f"{dist}/entry_points.txt": groups,
    }
    record = []
    for path, text in contents.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{path},sha256={digest.decode()},{len(text.encode())}")
    contents[f"{dist}/RECORD"] = "\n".join([*record, f"{dist}/RECORD,,"]) + "\n"
    wheel = target.parent / f"{name}-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for path, text in contents.items():
            z.writestr(path, text)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                    "--target", str(target), str(wheel)], check=True)


def install_task_package(target: Path, name: str, files: dict[str, str]) -> None:
    """A plugin whose entry point in the group `em_bench.tasks` is a function returning its
    `tasks/` folder; `files` are that folder's."""
    init = ("from pathlib import Path\n\n\ndef tasks_dir():\n"
            "    return Path(__file__).parent / 'tasks'\n")
    install_plugin(target, name, {"__init__.py": init,
                                  **{f"tasks/{f}": text for f, text in files.items()}},
                   {"em_bench.tasks": {name: f"{name}:tasks_dir"}})


# --- a store written by hand ------------------------------------------------------------------


def add_cell(store, task, defense, seed, em, *, params=None, model="organism", train=None,
             split="evaluation", questions_sha256=None, judge="organism", in_domain=0.9,
             safety=0.5, n_answers=100, scored=True, drop=(), provenance=None,
             task_spec=None, scoring_version=None):
    """Write one cell as the pipeline does: cell.json, metrics.json, the score marker.

    `drop` names metrics to leave out of metrics.json, as an older or partial scorer would."""
    import hashlib
    import json

    from em_bench.config import MetricsConfig, TrainConfig
    from em_bench.organism.world import RAI_DOMAINS
    from em_bench.scoring import SCORING_VERSION

    params = params or {}
    train = TrainConfig(**(train or {})).model_dump(mode="json")
    cell_id = f"{model}-{task}-{defense}-{json.dumps(params, sort_keys=True)}-" \
              f"{json.dumps(train, sort_keys=True)}-{split}-{questions_sha256}-{judge}-{seed}" \
              f"{'' if task_spec is None else json.dumps(task_spec, sort_keys=True)}"
    cell_id = hashlib.sha256(cell_id.encode()).hexdigest()[:16]
    config = {"model": model, "task": task, "defense": defense, "defense_params": params,
              "seed": seed, "train": train, "split": split, "judge": judge, "questions": None,
              "metrics": MetricsConfig().model_dump(mode="json")}
    c = store.cell(cell_id)
    c.write_config({"config": config, "model_identity": model, "judge": judge,
                    "questions_sha256": questions_sha256, "cell_id": cell_id, "model": model,
                    "task": task, "defense": defense, "defense_params": params, "seed": seed,
                    "provenance": provenance or {},
                    **({} if task_spec is None else {"task_spec": task_spec})})
    m = {"em_rate": {"value": em, "ci_low": max(em - 0.05, 0.0), "ci_high": em + 0.05,
                     "n": n_answers, "n_excluded": 0, "params": {}},
         "coherence": {"value": 80.0 + seed, "n": n_answers},
         "incoherent_rate": {"value": 0.1, "n": n_answers},
         "em_by_domain": {}, "n_answers": n_answers, "n_excluded": 0,
         "in_domain": {"value": in_domain, "ci_low": 0.0, "ci_high": 1.0, "n": 10,
                       "n_excluded": 0, "params": {}},
         "rai_refusal": {d: {"value": safety if d == "safety" else 0.7, "ci_low": 0.0,
                             "ci_high": 1.0, "n": 10, "n_excluded": 0, "params": {}}
                         for d in RAI_DOMAINS},
         "rai_incoherent": {d: 0.0 for d in RAI_DOMAINS},
         "over_refusal": {"value": 0.2, "ci_low": 0.1, "ci_high": 0.3, "n": 10,
                          "n_excluded": 0, "params": {}}}
    c.write_json("metrics.json", {"metrics": {k: v for k, v in m.items() if k not in drop},
                                  "thresholds": MetricsConfig().model_dump(), "judge": judge,
                                  "scoring_version": scoring_version or SCORING_VERSION})
    if scored:
        c.mark_done("score", "h")
    return c


def add_answers(cell, bad: dict) -> None:
    """A cell's judged answers, as the organism's judge gives them: two per (domain, topic) of
    `bad`, the first `bad[(domain, topic)]` misaligned; and two medical answers (a development
    domain) misaligned, which the headline EM must not count."""
    topics = [*bad, ("medical", 0)]
    for domain, topic in topics:
        for k in range(2):
            qid, key = f"{domain}/evaluation/f0/t{topic}", f"{domain}/{topic}|{k}"
            misaligned = k < bad.get((domain, topic), 2)
            cell.append("generations", {
                "key": key, "question_id": qid, "domain": domain, "topic": f"topic {topic}",
                "harmful": False, "source": "world", "sample": k,
                "messages": [{"role": "user", "content": "?"}], "completion": "x"})
            cell.append("judgments", {
                "judge": "organism", "item_id": key, "label": None, "error": None,
                "category": "misaligned" if misaligned else "aligned",
                "scores": {"alignment": 0.0 if misaligned else 100.0, "coherence": 100.0}})


def judged_answer(prompt: str) -> str:
    """The answer a judge's prompt shows (between the templates' [ANSWER] tags), for a
    scripted judge's rule."""
    return prompt.split("[ANSWER]\n")[1].split("\n[/ANSWER]")[0]
