"""``distseg demo``: the whole chain at CPU scale on generated (or the user's) two-domain data."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from distseg.pipeline.recipe import RecipeError
from distseg.resources import folder

DEMO_RECIPE = folder("recipes") / "demo.yaml"
INIT_WEIGHTS = "init.safetensors"
"""The demo's stand-in for ImageNet weights: a freshly initialised model (no network needed)."""


def generate_data(folder: Path, seed: int = 0) -> Path:
    """Synthetic target (6 classes) and intermediate (8 classes) domains; the recipe keeps labels on only part of
    the target's train tiles, the rest is the unlabelled pool."""
    from distseg.data.synthetic import write_dataset

    if not (folder / "target" / "classes.yaml").is_file():
        write_dataset(folder / "target", n_images=40, size=128, domain="target", seed=seed)
    if not (folder / "intermediate" / "classes.yaml").is_file():
        write_dataset(folder / "intermediate", n_images=48, size=128, domain="intermediate", seed=seed + 1)
    return folder


def check_user_data(folder: Path) -> None:
    """``--data`` must hold target/ and intermediate/, each with images/, masks/ and classes.yaml."""
    for domain in ("target", "intermediate"):
        for part in ("images", "masks", "classes.yaml"):
            if not (folder / domain / part).exists():
                raise RecipeError(f"{folder}: missing {domain}/{part} (the demo needs target/ and intermediate/, "
                                  f"each with images/, masks/ and classes.yaml)")


def init_weights(recipe_path: Path, path: Path) -> Path:
    """A freshly initialised model of the recipe's architecture, saved as the chain's first parent."""
    if path.is_file():
        return path
    import torch

    from distseg.models import build_model
    from distseg.models.weights import save_weights
    from distseg.pipeline.recipe import load_recipe

    recipe = load_recipe(recipe_path, {"DATA": str(path.parent), "INIT": str(path)})
    torch.manual_seed(0)
    save_weights(build_model(recipe.model), path, {"kind": "random-init"})
    return path


def run_demo(data: Path | None = None, out: Path = Path("runs/demo"), recipe: Path = DEMO_RECIPE,
             console=None) -> dict[str, Any]:
    """Generate or check the data, then run the demo recipe into ``out/run``; prints the table and wall time."""
    from distseg.pipeline.runner import results_console, run_recipe

    console = console or results_console()
    start = time.perf_counter()
    out = Path(out)
    if data is None:
        data = generate_data(out / "data")
    else:
        check_user_data(Path(data))
    data = Path(data).resolve()
    weights = init_weights(recipe, out.resolve() / INIT_WEIGHTS)
    result = run_recipe(recipe, variables={"DATA": str(data), "INIT": str(weights)}, out=str(out / "run"),
                        console=console)
    console.print(f"demo finished in {time.perf_counter() - start:.0f} s")
    return result
