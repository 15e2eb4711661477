"""``distseg demo``: the whole chain at CPU scale on generated (or the user's) two-domain data."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from distseg.pipeline.recipe import RecipeError
from distseg.resources import folder

DEMO_RECIPE = folder("recipes") / "demo.yaml"
INTERMEDIATE_DISTANCE = 0.3
"""Where the demo's intermediate domain lies between the target (0) and the synthetic "intermediate" domain (1): close
enough to transfer, as a user would choose it with ``distseg domain-gap``."""


def generate_data(folder: Path, seed: int = 0) -> Path:
    """Synthetic target (6 classes) and intermediate (8 classes) domains; the recipe keeps labels on only part of
    the target's train tiles, the rest is the unlabelled pool."""
    from distseg.data.synthetic import interpolate, write_dataset

    if not (folder / "target" / "classes.yaml").is_file():
        write_dataset(folder / "target", n_images=40, size=128, domain="target", seed=seed)
    if not (folder / "intermediate" / "classes.yaml").is_file():
        write_dataset(folder / "intermediate", n_images=48, size=128, domain=interpolate(INTERMEDIATE_DISTANCE),
                      seed=seed + 1)
    return folder


def check_user_data(folder: Path) -> None:
    """``--data`` must hold target/ and intermediate/, each with images/, masks/ and classes.yaml."""
    for domain in ("target", "intermediate"):
        for part in ("images", "masks", "classes.yaml"):
            if not (folder / domain / part).exists():
                raise RecipeError(f"{folder}: missing {domain}/{part} (the demo needs target/ and intermediate/, "
                                  f"each with images/, masks/ and classes.yaml)")


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
    result = run_recipe(recipe, variables={"DATA": str(data)}, out=str(out / "run"), console=console)
    console.print(f"demo finished in {time.perf_counter() - start:.0f} s")
    return result
