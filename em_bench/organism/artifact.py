"""The shipped organism: one build frozen inside the package, described by a manifest.

Every user holds the same model, and the first result takes seconds: `organism_path("organism")`
is the shipped folder whenever its manifest was made from today's recipe and world. Other
presets (other seeds, variant worlds), and a shipped folder that no longer matches its recipe,
are built from the recipe into the cache (`build.ensure_built`).

    shipped/<name>/
      manifest.json   the recipe and its digest, the world's digest, versions, each file's sha256
      build.json      the build's report (losses, seconds, threads)
      model.safetensors, config.json, tokenizer files    the instruct-tuned chat model
      pretrained/     the checkpoint before the instruct stage (SafeLoRA compares the two)
      sae/L<n>/       its SAE at each layer (sae-lens folders, with quality.json)
      latents/        its default latent sets (blockem's default), with the settings they answer

`em-bench organism ship` (release/ship.py) makes (or remakes) a shipped folder; a test fails
whenever the world or the recipe changes and the shipped folder is not remade.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

SHIPPED = Path(__file__).parent / "shipped"
MANIFEST = "manifest.json"
LATENT_SETTINGS = "settings.json"


def shipped_dir(name: str) -> Path:
    return SHIPPED / name


def read_manifest(folder: Path) -> dict | None:
    path = folder / MANIFEST
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@functools.lru_cache(maxsize=32)
def _weights_digest(path: str, mtime_ns: int, size: int) -> str:
    return sha256_file(Path(path))[:16]


def weights_digest(folder: Path) -> str:
    """What names an organism in a cell's hash: its chat model's weights, by content (a few
    megabytes, hashed in milliseconds), so differently built organisms never share a cell."""
    path = folder / "model.safetensors"
    st = path.stat()
    return _weights_digest(str(path.resolve()), st.st_mtime_ns, st.st_size)


def file_digests(folder: Path) -> dict[str, str]:
    """Every file of a shipped folder but its manifest -> sha256, by relative path."""
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.relative_to(folder).as_posix() != MANIFEST}


@functools.lru_cache(maxsize=8)
def _warn_stale(name: str, shipped: str, current: str) -> None:
    logger.warning("the shipped organism %r was made from another recipe or world (digest %s, "
                   "today's %s): building it from the recipe instead (`em-bench organism ship` "
                   "remakes the shipped one)", name, shipped, current)


def shipped_organism(name: str) -> Path | None:
    """The shipped folder of organism `name` when it matches today's recipe and world."""
    from em_bench.organism.recipe import PRESETS

    folder = shipped_dir(name)
    manifest = read_manifest(folder)
    if manifest is None:
        return None
    current = PRESETS[name].digest()
    if manifest["recipe_digest"] != current:
        _warn_stale(name, manifest["recipe_digest"], current)
        return None
    return folder


def shipped_sae(name: str, layer: int, settings: dict) -> Path | None:
    """The shipped SAE of organism `name` at `layer`, if it was trained with `settings`."""
    folder = shipped_organism(name)
    sae = None if folder is None else folder / "sae" / f"L{layer}"
    if sae is None or not (sae / "quality.json").is_file():
        return None
    quality = json.loads((sae / "quality.json").read_text(encoding="utf-8"))
    return sae if quality.get("settings") == settings else None


def shipped_latents(name: str, settings: dict) -> Path | None:
    """The shipped folder of organism `name`'s default latent sets, if found with `settings`."""
    folder = shipped_organism(name)
    latents = None if folder is None else folder / "latents"
    if latents is None or not (latents / LATENT_SETTINGS).is_file():
        return None
    found = json.loads((latents / LATENT_SETTINGS).read_text(encoding="utf-8"))
    return latents if found == settings else None
