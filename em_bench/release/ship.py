"""Making the shipped organism (`em-bench organism ship`), and checking it is what today's code
would ship. The shipped folder itself, and finding things in it, is organism/artifact.py's.

Shipping trains the organism's SAEs and finds its default latent sets (em_bench.sae), so it sits
above them; artifact.py, which they read the shipped folder with, stays below.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from importlib import metadata
from pathlib import Path

from em_bench.organism.artifact import (
    LATENT_SETTINGS,
    MANIFEST,
    file_digests,
    read_manifest,
    shipped_dir,
    shipped_latents,
    shipped_sae,
    weights_digest,
)
from em_bench.store import atomic_folder, atomic_write_json


def problems(name: str) -> list[str]:
    """Why the shipped organism `name` is not what today's code would ship (empty: it is)."""
    from em_bench.organism.recipe import PRESETS
    from em_bench.sae.discovered import default_settings
    from em_bench.sae.training import DEFAULTS

    folder = shipped_dir(name)
    manifest = read_manifest(folder)
    if manifest is None:
        return [f"no shipped organism {name!r} ({MANIFEST} missing)"]
    found = []
    if manifest["recipe_digest"] != PRESETS[name].digest():
        found.append(f"recipe digest {manifest['recipe_digest']} != today's "
                     f"{PRESETS[name].digest()} (the world or the recipe changed)")
        return found  # everything below depends on the recipe
    files = file_digests(folder)
    if files != manifest["files"]:
        changed = sorted(set(files.items()) ^ set(manifest["files"].items()))
        found.append(f"files differ from the manifest: {sorted({f for f, _ in changed})}")
    n_layers = manifest["recipe"]["num_layers"]
    missing = [layer for layer in range(n_layers)
               if shipped_sae(name, layer, DEFAULTS.model_dump(mode="json")) is None]
    if missing:
        found.append(f"no SAE with today's settings at layers {missing}")
    if shipped_latents(name, default_settings(name)) is None:
        found.append("no default latent sets with today's settings")
    return found


def ship(name: str = "organism") -> Path:
    """Build organism `name` from its recipe (or take the cached build), train its SAEs, find
    its default latent sets, and freeze all of it as the shipped folder with a manifest."""
    from em_bench.organism.build import ensure_built
    from em_bench.organism.recipe import PRESETS
    from em_bench.sae.discovered import default_latent_sets
    from em_bench.sae.training import ensure_organism_sae

    built = ensure_built(name)
    # Trained and found on the cache build, whose weights (and so identity) the shipped one keeps.
    saes = {layer: ensure_organism_sae(layer, name) for layer in range(PRESETS[name].num_layers)}
    latent_files = default_latent_sets(name)

    # Staged beside the old folder, which the SAEs and latent sets may still be read from.
    out = shipped_dir(name)
    staged = out.with_name(out.name + ".new")
    shutil.rmtree(staged, ignore_errors=True)
    with atomic_folder(staged) as tmp:
        _fill(tmp, built, saes, latent_files, name)
    shutil.rmtree(out, ignore_errors=True)
    staged.rename(out)
    return out


def _fill(tmp: Path, built: Path, saes: dict[int, Path], latent_files: list[Path],
          name: str) -> None:
    """Copy a build, its SAEs and latent sets into `tmp`, then write the manifest."""
    from em_bench.organism import world
    from em_bench.organism.recipe import BUILDER_VERSION, PRESETS
    from em_bench.sae.discovered import default_settings
    from em_bench.sae.training import DEFAULTS

    recipe = PRESETS[name]
    shutil.copytree(built, tmp, dirs_exist_ok=True)
    for layer, folder in saes.items():
        shutil.copytree(folder, tmp / "sae" / f"L{layer}")
    (tmp / "latents").mkdir()
    for path in latent_files:
        shutil.copy2(path, tmp / "latents" / path.name)
    atomic_write_json(tmp / "latents" / LATENT_SETTINGS, default_settings(name))
    versions = {pkg: metadata.version(pkg) for pkg in ("em-bench", "torch", "transformers",
                                                        "sae-lens")}
    files = file_digests(tmp)
    manifest = {
        "name": name,
        "recipe": recipe.model_dump(mode="json"),
        "recipe_digest": recipe.digest(),
        "world": {"version": world.WORLD_VERSION, "digest": world.content_digest()},
        "builder_version": BUILDER_VERSION,
        "weights_digest": weights_digest(tmp),
        "versions": versions,
        "sae": DEFAULTS.model_dump(mode="json"),
        "files": files,
        "digest": hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16],
    }
    atomic_write_json(tmp / MANIFEST, manifest)
