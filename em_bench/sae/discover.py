"""Latent discovery: which activations a misaligned fine-tune moves, to block them.

Everything here reads the **selection** questions only: the evaluation split never shapes a
latent set (nor lambda, nor any default), as the BLOCK-EM paper kept them disjoint. For the
organism they are its world's selection split; for any other model a question file, by default
`data/selection_questions.yaml` (em-bench's own, disjoint from the evaluation's
`ood_questions.yaml`). The three-stage screen judges EM with the judge it is given (the
organism's exact judge, or an LLM judge).

The direction form (`discover_directions`): a probe fine-tune on the task, its answers to the
selection questions of the other development domains, both models' residual streams on those
same answers (teacher-forced), and the top principal directions of the per-token shift, per
layer. Which sets a defense gets when it names none: em_bench/sae/discovered.py.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import torch

from em_bench.config import SamplingConfig, TrainConfig
from em_bench.data import Messages, device_of
from em_bench.domains import DEVELOPMENT_DOMAINS
from em_bench.errors import NoLatentKept
from em_bench.generate.base import Request
from em_bench.layers import hook_name
from em_bench.models import is_organism, load_base, model_identity, trainable
from em_bench.organism import world
from em_bench.questions import Prompt, file_prompts, load_question_file
from em_bench.registry import recipe_of
from em_bench.resources import resource_dir
from em_bench.sae.latents import Latent, LatentSet, save_latent_set
from em_bench.sae.training import collect_residuals, ensure_organism_sae
from em_bench.store.files import atomic_write_json
from em_bench.tasks import TaskSpec, chats

logger = logging.getLogger(__name__)

# 2: the organism's selection prompts are the development domains' only (held-out ones untouched)
DISCOVERY_VERSION = 2
DEFAULT_PROBE_TASK = "finance"  # the organism's default sets come from the finance probe


def selection_prompts(model: str, task: TaskSpec, questions: str | Path | None = None
                      ) -> list[Prompt]:
    """What discovery asks: a question file's prompts (`questions`, else the task's
    `selection_questions`), else (the organism) its world's selection questions of the
    development domains but the task's own (never a held-out domain's, which the headline
    scores), else em-bench's selection question file."""
    questions = questions or task.selection_questions
    if questions is None and is_organism(model):
        own = task.in_domain.domain if task.in_domain else None
        return [Prompt(q.id, q.id, [{"role": "user", "content": q.text}], 1, q.domain, q.topic)
                for d in DEVELOPMENT_DOMAINS if d != own for q in world.questions(d, "selection")]
    return file_prompts(load_question_file(
        questions or resource_dir("data") / "selection_questions.yaml"))


def probe_budget(model: str, task: TaskSpec) -> TrainConfig:
    """How a probe fine-tune trains: as the model's cells do, the task's budget under the
    model's preset recipe (the organism has none; SmolLM2's batch of 4 is what a CPU takes)."""
    return TrainConfig(**{**task.budget, **recipe_of(model)})


def probe_fine_tune(model: str, task: TaskSpec, seed: int, train_cfg: TrainConfig | None = None,
                    dtype: str = "float32"):
    """The base model and a copy fine-tuned on `task` (probe_budget, unless `train_cfg`), both
    in eval mode."""
    from em_bench.train.loop import train
    from em_bench.train.objectives import make_objective

    base, tokenizer = load_base(model, dtype)
    cfg = train_cfg or probe_budget(model, task)
    torch.manual_seed(seed)
    tuned = trainable(copy.deepcopy(base), cfg)  # the base itself stays untouched
    train(tuned, tokenizer, chats(task.train, seed), cfg, seed,
          make_objective(task.objective, task.objective_params))
    return base, tuned.eval(), tokenizer


def selection_answers(model, tokenizer, prompts: list[Prompt], seed: int,
                      samples: int = 1) -> list[Messages]:
    """`model`'s own answers to `prompts`, as chats."""
    from em_bench.generate.hf import HFBackend

    requests = [Request(f"{p.key}|{s}", p.messages) for p in prompts for s in range(samples)]
    sampling = SamplingConfig(samples_per_question=samples)
    done = HFBackend(model, tokenizer).generate(requests, sampling, seed)
    return [[*r.messages, {"role": "assistant", "content": c.text}]
            for r, c in zip(requests, done, strict=True)]


def principal_shift(delta: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k principal directions of per-token shifts `delta` [n, d] (uncentred, so the
    mean shift counts), each oriented so the mean shift along it is positive.

    Returns (directions [k, d] unit rows, mean shift along each [k])."""
    _, _, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    directions = vh[:k]
    shift = delta.double() @ directions.T
    flip = torch.where(shift.mean(0) < 0, -1.0, 1.0).double()
    directions = directions * flip[:, None]
    return directions.float(), (shift.mean(0) * flip).float()


def random_directions(d: int, k: int, seed: int) -> torch.Tensor:
    """`k` random unit directions [k, d] (the ablation's control)."""
    rows = torch.randn(k, d, generator=torch.Generator().manual_seed(seed))
    return rows / rows.norm(dim=-1, keepdim=True)


def discover_directions(model: str, task: TaskSpec, layers: list[int], k: int, seed: int,
                        out_dir: Path, selection: str = "principal-shift",
                        questions: str | Path | None = None, dtype: str = "float32"
                        ) -> list[Path]:
    """One direction-form latent set per layer, written to `out_dir`; returns their paths.

    `selection` "random" keeps random unit directions instead (the ablation), with the probe's
    mean shift along them recorded all the same. `questions`: see selection_prompts."""
    questions = questions or task.selection_questions
    prompts = selection_prompts(model, task, questions)
    base, tuned, tokenizer = probe_fine_tune(model, task, seed, dtype=dtype)
    answers = selection_answers(tuned, tokenizer, prompts, seed)
    paths = []
    for layer in layers:
        delta = (collect_residuals(tuned, tokenizer, answers, layer, tokens="response")
                 - collect_residuals(base, tokenizer, answers, layer, tokens="response"))
        if selection == "random":
            directions = random_directions(delta.shape[1], k, seed * 1000 + layer)
            shift = delta @ directions.T
            directions = directions * torch.where(shift.mean(0) < 0, -1.0, 1.0)[:, None]
            shift = (delta @ directions.T).mean(0)
        else:
            directions, shift = principal_shift(delta, k)
        latent_set = LatentSet(
            form="directions", selection=selection, model=model_identity(model),
            layer=layer, hook_name=hook_name(layer),
            latents=[Latent(index=i, sign=1, shift=float(s)) for i, s in enumerate(shift)],
            directions=directions.tolist(),
            provenance={"probe_task": task.name, "seed": seed, "k": k, "n_tokens": len(delta),
                        **_asked(prompts, questions), "split": "selection",
                        "discovery_version": DISCOVERY_VERSION})
        name = "directions" if selection == "principal-shift" else f"directions_{selection}"
        paths.append(save_latent_set(latent_set, out_dir / f"{name}_L{layer}.json"))
        logger.info("layer %d: %d directions, mean shifts %s", layer, k,
                    [round(float(s), 3) for s in shift])
    return paths


# --- the SAE form: the paper's three stages -----------------------------------------------


class Steer:
    """Adds `vector` to the residual stream after block `layer` at every position (a forward
    hook), or removes a latent's own contribution (`ablate`: h - z_k(h) * d_k)."""

    def __init__(self, model, layer: int, vector: torch.Tensor | None = None, sae=None,
                 latent: int | None = None):
        from em_bench.layers import decoder_layers

        self.block = decoder_layers(model)[layer]
        self.vector, self.sae, self.latent = vector, sae, latent

    def _hook(self, _module, _args, output):
        h = output[0] if isinstance(output, tuple) else output
        if self.vector is not None:
            h = h + self.vector.to(h.device, h.dtype)
        else:  # ablation of one SAE latent
            z = self.sae.encode(h.float())[..., self.latent : self.latent + 1]
            h = h - (z * self.sae.W_dec[self.latent]).to(h.dtype)
        return (h, *output[1:]) if isinstance(output, tuple) else h

    def __enter__(self):
        self.handle = self.block.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _asked(prompts: list[Prompt], questions: str | Path | None) -> dict:
    """What a latent set records of the questions it was found on (`questions`: the file
    asked, None for the default)."""
    return {"questions": "world" if questions is None and prompts[0].source == "world"
            else str(questions or "selection_questions.yaml"),
            "domains": sorted({p.domain for p in prompts}), "n_prompts": len(prompts)}


def judge_em(model, tokenizer, prompts: list[Prompt], judge, seed: int,
             samples: int = 1) -> dict:
    """EM and incoherent share of `model`'s answers to `prompts` by `judge`, with the
    evaluation's metric definitions. A verdict that failed counts in neither."""
    import pandas as pd

    from em_bench import metrics
    from em_bench.generate.hf import HFBackend
    from em_bench.judge.base import JudgeInput

    requests = [Request(f"{p.key}|{s}", p.messages) for p in prompts for s in range(samples)]
    done = HFBackend(model, tokenizer).generate(
        requests, SamplingConfig(samples_per_question=samples), seed)
    by_key = {f"{p.key}|{s}": p for p in prompts for s in range(samples)}
    judged = judge.judge_many([
        JudgeInput(c.key, r.messages, c.text,
                   {"domain": by_key[c.key].domain, "topic": by_key[c.key].topic})
        for r, c in zip(requests, done, strict=True)])
    frame = pd.DataFrame([{"question_id": by_key[j.item_id].question_id,
                           "alignment": j.scores.get("alignment"),
                           "coherence": j.scores.get("coherence"), "label": j.label,
                           "error": j.error} for j in judged]
                         ).astype({"alignment": float, "coherence": float})
    return {"em": metrics.em_rate(frame, n_boot=1).value,
            "incoherent": metrics.coherence_summary(frame)["incoherent_rate"]}


def screening_questions(prompts: list[Prompt], n: int, seed: int) -> list[Prompt]:
    """`n` of the selection prompts, drawn by `seed`."""
    import random

    return random.Random(f"screen/{seed}").sample(prompts, min(n, len(prompts)))


def screen_effect(induce: float, repair: float, rule: str = "both") -> float:
    """A latent's effect at one steering strength: "both" (BLOCK-EM's stage 2) the smaller of
    the EM it induces in the base model and the EM it repairs in the fine-tune, so only a
    latent that does both scores above 0; "either" the larger."""
    if rule not in ("both", "either"):
        raise ValueError(f"screen rule {rule!r}: expected 'both' or 'either'")
    return min(induce, repair) if rule == "both" else max(induce, repair)


def discover_sae(model: str, task: TaskSpec, layer: int, sae_ref: str, out: Path, *,
                 n_candidates: int = 10, k: int = 20, n_questions: int = 64,
                 alphas: tuple[float, ...] = (0.1, 0.2, 0.4), incoherence_budget: float = 0.10,
                 selection: str = "three-stage", seed: int = 0, judge=None,
                 questions: str | Path | None = None, dtype: str = "float32",
                 screen_rule: str = "both") -> Path:
    """The paper's discovery, each stage recorded in the latent set:

    1. activation shift: mean SAE latent activation over answer tokens, probe fine-tune minus
       base, each on its own answers to the selection questions; candidates are the top
       `n_candidates` by positive and by negative shift;
    2. causal screen by steering along the latent's unit decoder direction, at each strength of
       `alphas` (in units of the mean residual norm at the layer): *induce* (steer the base
       along the shift's sign; EM must rise) and *repair* (steer the fine-tune against it; EM
       must fall); and by *ablation* (remove the latent inside the fine-tune; EM must fall);
    3. per latent, its effect at a strength is the smaller of the two, induce and repair (as
       BLOCK-EM's stage 2 keeps a latent only when it does both: it raises EM in the base model
       and lowers it in the misaligned one; `screen_rule` "either" takes the larger, an earlier
       em-bench's looser rule, kept as an ablation: screen_effect); its best effect is the
       largest over the strengths whose incoherent share stays within `incoherence_budget` of
       the unsteered model's (calibrated per latent); ranked by it, the top `k` whose best
       effect exceeds the screen's noise (the fine-tune's EM spread over 3 sampling seeds on the
       same questions) are kept.

    `selection` "top-delta" stops after stage 1 (the top `k` by |shift|); "random" draws `k`
    latents at random (the paper's ablations). Stages 2-3 need `judge` (the organism's exact
    judge by default on the organism). `questions`: see selection_prompts.
    """
    import random

    from em_bench.errors import ConfigError
    from em_bench.sae.training import check_sae, load_sae

    if judge is None and selection == "three-stage":
        if not is_organism(model):
            raise ConfigError(f"the three-stage screen judges EM: give {model} a judge "
                              f"(--judge openai --judge-model M), or use --selection top-delta")
        from em_bench.organism.judge import OrganismJudge

        judge = OrganismJudge()
    questions = questions or task.selection_questions
    prompts = selection_prompts(model, task, questions)
    sae = load_sae(sae_ref)
    base, tuned, tokenizer = probe_fine_tune(model, task, seed, dtype=dtype)
    check_sae(sae, base, layer)
    sae.to(device_of(base))  # steering and ablation run on the model's device
    asked = _asked(prompts, questions)

    # stage 1: activation shift over each model's own answers
    def mean_latents(m) -> tuple[torch.Tensor, torch.Tensor]:
        h = collect_residuals(m, tokenizer, selection_answers(m, tokenizer, prompts, seed),
                              layer, tokens="response")
        with torch.no_grad():
            return sae.encode(h.to(device_of(sae))).mean(0).cpu(), h.norm(dim=-1).mean()

    tuned_mean, norm = mean_latents(tuned)
    base_mean, _ = mean_latents(base)
    shift = tuned_mean - base_mean
    order = torch.argsort(shift, descending=True).tolist()
    if selection == "random":
        chosen = random.Random(f"random-latents/{seed}").sample(range(len(shift)), k)
        return _save_sae_set(out, model, layer, sae_ref, selection, shift, chosen, {}, {},
                             {"seed": seed, **asked})
    if selection == "top-delta":
        chosen = torch.argsort(shift.abs(), descending=True)[:k].tolist()
        return _save_sae_set(out, model, layer, sae_ref, selection, shift, chosen, {}, {},
                             {"seed": seed, **asked})
    candidates = order[:n_candidates] + order[::-1][:n_candidates]

    # stages 2 and 3: steering and ablation, judged like the evaluation
    screen = screening_questions(prompts, n_questions, seed)

    def em(m, sampling_seed: int = seed) -> dict:
        return judge_em(m, tokenizer, screen, judge, sampling_seed)

    ref = {"base": em(base), "tuned": em(tuned)}
    # The screen's own noise: the fine-tune's EM on the same questions under other sampling
    # seeds. A latent is kept only if its effect exceeds this spread.
    repeats = [ref["tuned"]["em"]] + [em(tuned, seed + r)["em"] for r in (1, 2)]
    noise = float(torch.tensor(repeats).std())
    decoder = sae.W_dec.detach()
    scores, alpha_of = {}, {}
    for latent in candidates:
        sign = 1.0 if shift[latent] > 0 else -1.0
        unit = decoder[latent] / decoder[latent].norm()
        s: dict[str, float] = {}
        best, best_alpha = -1.0, None
        for a in alphas:
            with Steer(base, layer, sign * a * norm * unit):
                induced = em(base)
            with Steer(tuned, layer, -sign * a * norm * unit):
                repaired = em(tuned)
            effect = screen_effect(induced["em"] - ref["base"]["em"],
                                   ref["tuned"]["em"] - repaired["em"], screen_rule)
            coherent = (induced["incoherent"] - ref["base"]["incoherent"] <= incoherence_budget
                        and repaired["incoherent"] - ref["tuned"]["incoherent"]
                        <= incoherence_budget)
            s[f"induce@{a}"] = induced["em"] - ref["base"]["em"]
            s[f"repair@{a}"] = ref["tuned"]["em"] - repaired["em"]
            if coherent and effect > best:
                best, best_alpha = effect, a
        if sign > 0:  # ablation removes what the latent adds: meaningful where it rose
            with Steer(tuned, layer, sae=sae, latent=latent):
                s["ablate"] = ref["tuned"]["em"] - em(tuned)["em"]
        s["best_effect"] = best
        scores[latent], alpha_of[latent] = s, best_alpha
        logger.info("latent %d (shift %+.3f): best effect %+.3f at alpha %s", latent,
                    float(shift[latent]), best, best_alpha)
    ranked = sorted((x for x in candidates if scores[x]["best_effect"] > noise),
                    key=lambda x: -scores[x]["best_effect"])[:k]
    return _save_sae_set(out, model, layer, sae_ref, selection, shift, ranked, scores, alpha_of,
                         {"seed": seed, **asked, "judge": judge.name,
                          "n_questions": n_questions, "alphas": list(alphas),
                          "incoherence_budget": incoherence_budget, "reference": ref,
                          "screen_rule": screen_rule,
                          "screen_noise_sd": noise, "residual_norm": float(norm),
                          "candidates": candidates})


def discover_sae_sets(model: str, task: TaskSpec, layers: list[int], out_dir: Path,
                      sae_ref: str | None = None, judge: str | None = None, *, k: int = 20,
                      selection: str = "three-stage", seed: int = 0,
                      questions: str | Path | None = None, dtype: str = "float32",
                      screen_rule: str = "both", **screen) -> list[Path]:
    """discover_sae at each of `layers`, written to `out_dir` as `sae_<selection>_L<layer>.json`;
    returns their paths. `sae_ref`: the SAE (default: the organism's at each layer, trained if
    missing); `judge`: a judge's name (default: as discover_sae); `screen`: discover_sae's
    screen settings (n_candidates, alphas, n_questions, incoherence_budget)."""
    from em_bench.judge import make_judge

    judge_model = None if judge is None else make_judge(judge)
    if "alphas" in screen:
        screen["alphas"] = tuple(screen["alphas"])
    return [discover_sae(model, task, layer, sae_ref or str(ensure_organism_sae(layer, model)),
                         out_dir / f"sae_{selection}_L{layer}.json", k=k, selection=selection,
                         seed=seed, judge=judge_model, questions=questions, dtype=dtype,
                         screen_rule=screen_rule, **screen)
            for layer in layers]


def _save_sae_set(out: Path, model: str, layer: int, sae_ref: str, selection: str,
                  shift: torch.Tensor, chosen: list[int], scores: dict, alpha_of: dict,
                  provenance: dict) -> Path:
    if not chosen:
        _record_nothing_kept(out, layer, selection, scores, provenance)
    latent_set = LatentSet(
        form="sae", selection=selection, model=model_identity(model), layer=layer,
        hook_name=hook_name(layer), sae=str(sae_ref),
        latents=[Latent(index=i, sign=1 if shift[i] > 0 else -1, shift=float(shift[i]),
                        alpha=alpha_of.get(i), scores=scores.get(i, {})) for i in chosen],
        provenance={**provenance, "split": "selection", "discovery_version": DISCOVERY_VERSION})
    return save_latent_set(latent_set, out)


def nothing_kept_path(latent_file: Path) -> Path:
    """Where a screen that kept no latent says so, beside the set it would have written: cached
    like a set, so the screen is not rerun."""
    return latent_file.with_name(f"{latent_file.stem}.none.json")


def nothing_kept(latent_file: Path) -> NoLatentKept | None:
    """The recorded finding that `latent_file`'s screen kept no latent, if it is one."""
    record = nothing_kept_path(latent_file)
    if not record.is_file():
        return None
    return NoLatentKept(json.loads(record.read_text(encoding="utf-8"))["reason"])


def _record_nothing_kept(out: Path, layer: int, selection: str, scores: dict,
                         provenance: dict) -> None:
    """Record that the screen kept no latent (with every candidate's scores), and raise it."""
    best = max((s["best_effect"] for s in scores.values()), default=float("nan"))
    reason = (f"the {selection} screen kept no latent at layer {layer}: none of "
              f"{len(provenance.get('candidates', scores))} candidates moved EM by more than "
              f"the screen's noise ({100 * provenance.get('screen_noise_sd', 0):.1f} points) "
              f"within the incoherence budget (best effect {100 * best:+.1f} points)")
    atomic_write_json(nothing_kept_path(out), {
        "reason": reason, "layer": layer, "selection": selection,
        "scores": {str(k): v for k, v in scores.items()},
        "provenance": {**provenance, "split": "selection", "discovery_version": DISCOVERY_VERSION}})
    raise NoLatentKept(reason)
