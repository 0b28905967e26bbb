"""`safelora`: Safe LoRA (Hsu et al. 2024, arXiv 2405.16833), applied after every optimizer step.

For each LoRA-adapted linear layer, with W_aligned the weight the adapter is trained on (the
instruct-tuned model) and W_base the same weight in the pretrained checkpoint:

    V = W_aligned - W_base                 the layer's alignment matrix     [out, in]
    C = V V^T / ||V||_F                    the paper's projection operator  [out, out]
    dW = s * B A                           the adapter's update (s: the LoRA scaling)
    cos = <dW, C dW> / (||dW||_F ||C dW||_F)
    if cos < tau:  B <- C B                (so dW <- C dW)

C is exactly the paper's (its Eq. for C, and the official code: `V @ V.T / torch.norm(V)`,
Frobenius norm). It is *not* an orthogonal projector: C = U diag(s_i^2 / ||s||_2) U^T for V's
singular values s_i and left singular vectors U, so C dW keeps dW's part in V's column space,
reweighted toward V's dominant directions and rescaled (C^2 = C only when V's nonzero singular
values all equal sqrt(rank V)). The paper names the exact projector V (V^T V)^-1 V^T as the
costly alternative; an alignment matrix of full rank (the organism's is) makes that the identity,
which would project nothing, so this module keeps the paper's C. On the shipped organism C's
largest eigenvalue is 0.04 to 0.23 per layer, and a random rank-8 update has a cosine of 0.2 to
0.55 with its projection, which keeps about 1% of its norm: at tau = 0.5 most layers would be
projected at every step, each time shrinking the update about a hundred-fold.

Unlike the paper, which projects a finished adapter once, the projection runs after each step
(`after_step`), so the fine-tune continues from the projected weights (the optimizer's moments
are left as they are). The cosine is scale-free, so s does not matter. A layer whose update is
still zero (B = 0 at LoRA's start) is skipped. A layer is projected when `cos < tau` (the
official code projects at cos <= tau; they differ only at equality).

`projected` counts the (layer, step) projections since `prepare`, and `last_cosines` holds each
layer's cosine at the last step (name -> float): `terms` returns nothing, since terms are summed
into the loss, so the counts are attributes for a caller to read, not logged terms.

The pretrained checkpoint (`base_model`): for an organism, the `pretrained/` folder its build
saves beside the chat model (organism/build.py); for any other model it must be given. Its
weights are read on the CPU (only the adapted layers', from its safetensors files); the
projectors are kept on the adapter's device, each as C [out, out] or as the scaled V [out, in],
whichever is smaller, in float32.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import Field

from em_bench.defenses.base import DefenseContext, DefenseParams
from em_bench.errors import ConfigError

SAFELORA_VERSION = 1  # the projection's definition (in the cell hash)
PRETRAINED = "pretrained"  # the organism's pretrained checkpoint, inside its folder
NEGLIGIBLE = 1e-5  # a projection this small relative to the update is taken as zero (cos 0)


class SafeLoRAParams(DefenseParams):
    tau: float = Field(0.5, gt=0, lt=1, description="cosine threshold: a layer whose LoRA update "
                       "has a cosine below tau with its projection is projected")
    base_model: str | None = Field(None, description="the pretrained (unaligned) checkpoint of "
                                   "the model: a local folder or a hub id; none: an organism's "
                                   "own pretrained checkpoint")


class Projector:
    """The paper's C = V V^T / ||V||_F for one layer, applied to a matrix on the left.

    Kept as C when V has no more rows than columns, else as V / sqrt(||V||_F) (then
    C X = V' (V'^T X)): whichever takes less memory, the same product.
    """

    def __init__(self, V: torch.Tensor):
        V = V.float()
        norm = torch.linalg.matrix_norm(V)  # Frobenius
        if norm == 0:
            raise ValueError("the alignment matrix is zero")
        if V.shape[0] <= V.shape[1]:
            self.C, self.V = V @ V.T / norm, None
            self.scale = torch.linalg.matrix_norm(self.C).item()
        else:
            self.C, self.V = None, V / norm.sqrt()
            self.scale = torch.linalg.matrix_norm(self.V.T @ self.V).item()  # ||C||_F

    def to(self, device) -> Projector:
        self.C = None if self.C is None else self.C.to(device)
        self.V = None if self.V is None else self.V.to(device)
        return self

    def __call__(self, X: torch.Tensor) -> torch.Tensor:
        X = X.float()
        return self.C @ X if self.C is not None else self.V @ (self.V.T @ X)


def update_cosine(B: torch.Tensor, A: torch.Tensor, CB: torch.Tensor,
                  scale: float = 1.0) -> float | None:
    """cos(vec(B A), vec(C B A)) from r x r matrices (never the [out, in] update itself):
    <BA, CBA> = tr(B^T CB A A^T), ||BA||^2 = tr(B^T B A A^T), ||CBA||^2 = tr(CB^T CB A A^T).

    None when the update is zero (nothing to project). 0 when its projection is negligible,
    below NEGLIGIBLE * scale (C's Frobenius norm, a bound on its largest eigenvalue) times the
    update's norm: an update orthogonal to C's range projects to float rounding, whose
    direction, and so cosine, is noise."""
    B, A = B.float(), A.float()
    G = A @ A.T  # symmetric, so tr(X G) = sum(X * G)
    norm2 = ((B.T @ B) * G).sum()
    if norm2 <= 0:
        return None
    proj2 = ((CB.T @ CB) * G).sum()
    if proj2 <= (NEGLIGIBLE * scale) ** 2 * norm2:
        return 0.0
    return (((B.T @ CB) * G).sum() / (norm2 * proj2).sqrt()).item()


class SafeLoRA:
    """Safe LoRA: after each step, a layer's LoRA update that strays from the alignment
    subspace (cosine with its projection below tau) is replaced by its projection."""

    name = "safelora"
    Params = SafeLoRAParams
    strength = "tau"  # the parameter the selection rule sweeps
    family = "weights"  # what it acts on (the leaderboard's family column)
    needs = ("pretrained checkpoint",)  # what it needs beyond the task's data

    @staticmethod
    def inputs(params: dict, ctx: DefenseContext) -> dict:
        return safelora_inputs(params, ctx)

    def __init__(self, params: SafeLoRAParams, ctx: DefenseContext):
        self.tau, self.base_model, self.model_name = params.tau, params.base_model, ctx.model
        if self.base_model is None:
            _needs_organism(ctx.model)
        self.layers: dict[str, tuple[torch.nn.Module, str]] = {}
        self.projectors: dict[str, Projector] = {}
        self.projected, self.last_cosines = 0, {}

    def prepare(self, model, tokenizer, encoded: list[tuple], max_len: int) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise ConfigError("defense safelora: a sharded fine-tune (processes > 1) splits each "
                              "LoRA B across processes, which this projection does not handle; "
                              "run it in one process")
        layers = lora_layers(model)
        if not layers:
            raise ConfigError("defense safelora projects LoRA updates; this fine-tune has no LoRA "
                              "adapter (use adapter: lora)")
        folder = base_checkpoint(self.base_model, self.model_name)
        base = load_tensors(folder, [f"{name}.weight" for name in layers])
        self.layers, self.projectors = layers, {}
        for name, (module, adapter) in layers.items():
            aligned = module.get_base_layer().weight.detach().to("cpu", torch.float32)
            if base[f"{name}.weight"].shape != aligned.shape:
                raise ConfigError(f"defense safelora: {name}.weight is "
                                  f"{tuple(base[f'{name}.weight'].shape)} in the base checkpoint "
                                  f"{folder} but {tuple(aligned.shape)} in the model")
            V = aligned - base[f"{name}.weight"].float()
            try:
                projector = Projector(V)
            except ValueError:
                raise ConfigError(f"defense safelora: {name} is the same in the base checkpoint "
                                  f"{folder} as in the model; base_model must be the model's "
                                  f"pretrained checkpoint, before alignment") from None
            self.projectors[name] = projector.to(module.lora_B[adapter].weight.device)
        self.projected, self.last_cosines = 0, {}

    def terms(self, batch, outputs) -> dict:
        return {}

    @torch.no_grad()
    def after_step(self, model, step: int) -> None:
        """Project each layer whose update's cosine with its projection is below tau."""
        self.last_cosines = {}
        for name, (module, adapter) in self.layers.items():
            B, A = module.lora_B[adapter].weight, module.lora_A[adapter].weight
            projector = self.projectors[name]
            CB = projector(B)
            cos = update_cosine(B, A, CB, projector.scale)
            if cos is None:  # no update yet
                continue
            self.last_cosines[name] = cos
            if cos < self.tau:
                B.copy_(CB.to(B.dtype))
                self.projected += 1

    def finish(self) -> None:
        self.projectors, self.layers = {}, {}

    def report(self) -> dict:
        """How often a layer's update was projected (the training summary's record)."""
        return {"projected": self.projected, "tau": self.tau}


def lora_layers(model) -> dict[str, tuple[torch.nn.Module, str]]:
    """The LoRA-adapted linear layers of a (peft) model: their names in the wrapped model's
    state dict (a checkpoint's: `model.layers.0.self_attn.q_proj`) -> (layer, active adapter)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    found = {}
    for name, module in inner.named_modules():
        if not (hasattr(module, "lora_A") and hasattr(module, "lora_B")):
            continue
        for adapter in getattr(module, "active_adapters", ["default"]):
            if adapter not in module.lora_A:
                continue
            if not isinstance(module.get_base_layer(), torch.nn.Linear) or getattr(
                    module, "fan_in_fan_out", False):
                raise ConfigError(f"defense safelora: {name} is not a plain linear layer "
                                  f"(projects LoRA updates of torch Linear layers only)")
            if getattr(module, "lora_variant", {}).get(adapter) is not None:
                raise ConfigError(f"defense safelora: {name} is a LoRA variant (DoRA?); safelora "
                                  f"projects plain LoRA updates B A")
            if name in found:
                raise ConfigError(f"defense safelora: {name} has several active adapters")
            found[name] = (module, adapter)
    return found


def base_checkpoint(base_model: str | None, model: str) -> Path:
    """The folder of the pretrained checkpoint: `base_model` (a folder, or a hub id fetched
    into the hub cache), or an organism's own `pretrained/` folder."""
    if base_model is None:
        folder = organism_pretrained(model)
        if not folder.is_dir():
            raise ConfigError(f"defense safelora: the organism {model} has no pretrained "
                              f"checkpoint at {folder} (rebuild it: em-bench organism build)")
        return folder
    if Path(base_model).is_dir():
        return Path(base_model)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(base_model, allow_patterns=["*.safetensors", "*.json"]))
    except Exception as e:  # not a folder and not on the hub (or offline)
        raise ConfigError(f"defense safelora: base_model {base_model!r} is neither a folder nor "
                          f"a reachable hub model ({str(e).splitlines()[0] if str(e) else e})"
                          ) from None


def organism_pretrained(model: str) -> Path:
    """An organism's pretrained checkpoint: `pretrained/` inside its folder, which is the shipped
    one when it matches today's recipe (em_bench/organism/shipped/<name>/), else its build in
    the cache (built first if missing, as loading the organism itself would)."""
    from em_bench.organism.build import ensure_organism

    return ensure_organism(model) / PRETRAINED


def load_tensors(folder: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """The named tensors of a checkpoint folder (its safetensors files, sharded or not, else its
    pytorch_model*.bin), on the CPU."""
    wanted, found = set(names), {}
    files = sorted(folder.glob("*.safetensors"))
    if files:
        from safetensors import safe_open

        for file in files:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for key in wanted.intersection(f.keys()):
                    found[key] = f.get_tensor(key)
    else:
        for file in sorted(folder.glob("pytorch_model*.bin")):
            state = torch.load(file, map_location="cpu", weights_only=True)
            found.update({k: v for k, v in state.items() if k in wanted})
    if not files and not found:
        raise ConfigError(f"defense safelora: no weights in the base checkpoint {folder} "
                          f"(*.safetensors or pytorch_model*.bin)")
    missing = sorted(wanted - set(found))
    if missing:
        raise ConfigError(f"defense safelora: the base checkpoint {folder} has no {missing[0]}"
                          f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; "
                          f"it must be the same architecture as the model")
    return found


def safelora_inputs(params: dict, ctx: DefenseContext) -> dict:
    """What a safelora cell depends on beyond its parameters: the base checkpoint's content. For
    an organism, its pretrained weights' sha256 (from the shipped manifest, else hashed); for a
    given checkpoint, em-bench's identity of a model (models.model_identity)."""
    from em_bench.models import model_identity

    version = {"safelora_version": SAFELORA_VERSION}
    if params.get("base_model") is not None:
        return {"base_model": model_identity(params["base_model"]), **version}
    _needs_organism(ctx.model)
    return {"base_sha256": organism_pretrained_digest(ctx.model), **version}


def organism_pretrained_digest(model: str) -> str:
    """The sha256 of an organism's pretrained weights: the manifest's, when its folder is the
    shipped one, else the file's (a cache build has no manifest)."""
    from em_bench.organism.artifact import read_manifest, sha256_file

    folder = organism_pretrained(model)
    weights = folder / "model.safetensors"
    manifest = read_manifest(folder.parent) or {}
    digest = manifest.get("files", {}).get(f"{PRETRAINED}/model.safetensors")
    if digest is not None:
        return digest
    if not weights.is_file():
        raise ConfigError(f"defense safelora: the organism {model} has no pretrained checkpoint "
                          f"at {folder} (rebuild it: em-bench organism build)")
    return sha256_file(weights)


def _needs_organism(model: str) -> None:
    from em_bench.models import is_organism

    if not is_organism(model):
        raise ConfigError(f"defense safelora: base_model has no default for {model}; a base "
                          f"checkpoint is needed (the model's pretrained, unaligned one): give "
                          f"its folder or hub id, e.g. --set base_model=meta-llama/Llama-2-7b-hf")
