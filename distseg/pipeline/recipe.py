"""The recipe file: a typed schema, ``${VAR}`` substitution and path resolution.

A recipe is a YAML mapping (see docs/recipes.md). Strings may hold ``${NAME}`` variables, taken from the command
line (``--var NAME=VALUE``), then the environment, then the recipe's own ``vars:``. Relative paths are relative to
the recipe file's folder, so a recipe and its data can move together; only the default run folder
(``runs/<name>``) is relative to the working directory.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from distseg.config import ConfigError, from_dict, read_mapping
from distseg.models import ModelConfig

StageKind = Literal["head", "distill", "ssl", "eval"]
Launcher = Literal["deepspeed", "torchrun", "python"]
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class RecipeError(ValueError):
    """A recipe is malformed or inconsistent; raised before anything runs. The message names file and stage."""


@dataclass
class ShardSpec:
    """How ``distseg run`` builds a dataset's shards from folders (the options of ``distseg shard-data``)."""

    images: str | None = None
    """Folder of images (labelled when ``masks`` is given)."""
    masks: str | None = None
    """Folder of masks matching ``images`` by file stem."""
    unlabeled: str | None = None
    """Folder of extra unlabelled images (the 'unlabeled' split)."""
    classes: str | None = None
    """Class-map file (YAML/JSON); required with ``masks``."""
    tile: int | None = None
    """Cut images into tiles of this side (None: whole images)."""
    overlap: int = 0
    """Tile overlap in pixels."""
    split: str = "8:1:1"
    """train:val:test ratios, applied to source images or to ``group_by`` groups."""
    labeled_fraction: float = 1.0
    """Fraction of the train tiles that keep labels; the rest join the unlabelled pool."""
    group_by: str | None = None
    """Regex over file names whose first group keeps related images in one split (e.g. a scene id)."""
    seed: int = 0
    """Seed of the split and of the labelled subset."""
    shard_size: int = 1000
    """Samples per shard file."""

    def __post_init__(self) -> None:
        if self.images is None and self.unlabeled is None:
            raise ValueError("a shard block needs 'images' and/or 'unlabeled'")
        if self.masks is not None and self.classes is None:
            raise ValueError("'masks' needs 'classes' (a class-map file)")
        if not 0 < self.labeled_fraction <= 1:
            raise ValueError("labeled_fraction must be in (0, 1]")

    def options(self) -> dict[str, Any]:
        """The manifest's ``options`` these settings produce (to tell whether existing shards are current)."""
        return {"tile": self.tile, "overlap": self.overlap, "split": self.split,
                "labeled_fraction": self.labeled_fraction, "group_by": self.group_by, "seed": self.seed}


@dataclass
class DatasetSpec:
    """One named dataset: a shard folder, optionally built from folders by ``distseg run``."""

    path: str = ""
    """Shard folder (with manifest.json). Default with ``shard``: ``<run folder>/shards/<name>``."""
    shard: ShardSpec | None = None
    """Build ``path`` from these folders first (skipped when the folder already holds the same shards)."""

    def __post_init__(self) -> None:
        if not self.path and self.shard is None:
            raise ValueError("a dataset needs 'path' (a shard folder) or a 'shard' block")


@dataclass
class EvalOptions:
    """Options of an ``eval`` stage (its ``overrides``)."""

    split: str = "test"
    """Split to evaluate; 'test' keeps the table's rows comparable and untouched by model selection."""
    batch_size: int = 4
    sliding: bool = False
    """Also run sliding-window evaluation (slower; whole tiles are what the table reports)."""
    tile: int = 512
    """Sliding-window tile side."""

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.tile < 1:
            raise ValueError("batch_size and tile must be >= 1")


@dataclass
class StageSpec:
    """One step of the chain."""

    name: str
    """Unique name; also the stage's folder under the run folder."""
    kind: StageKind
    """head (new classifier), distill (student from teacher), ssl (mean teacher) or eval (test-split metrics)."""
    data: str = ""
    """Dataset name: the stage's labelled data (or, for eval, the data evaluated on)."""
    parent: str | None = None
    """Earlier stage (by name) whose model this stage starts from, distils from or evaluates."""
    weights: str | None = None
    """Instead of ``parent``: a weights file or finished stage folder from outside this recipe."""
    unlabeled: str | None = None
    """(ssl) Dataset whose 'unlabeled' split is the unlabelled pool (default: ``data``)."""
    label: str | None = None
    """(eval) Row label in the results table (default: the stage name)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """StageConfig fields for this stage (nested), or EvalOptions fields for an eval stage."""

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name):
            raise ValueError(f"stage name {self.name!r} must be letters, digits, '_', '-' or '.'")
        if self.parent and self.weights:
            raise ValueError(f"stage {self.name!r}: give 'parent' or 'weights', not both")
        if self.kind == "eval" and not (self.parent or self.weights):
            raise ValueError(f"stage {self.name!r}: an eval stage needs 'parent' (the stage to evaluate)")


@dataclass
class Recipe:
    """A whole chain: datasets, model, launch settings and stages."""

    stages: list[StageSpec]
    """The stages; each runs after the stages it references."""
    datasets: dict[str, Any] = field(default_factory=dict)
    """Name -> DatasetSpec mapping (a bare string is a shard folder)."""
    name: str = ""
    """Run name (default: the recipe file's stem)."""
    out: str = ""
    """Run folder (default: ``runs/<name>`` in the working directory)."""
    vars: dict[str, Any] = field(default_factory=dict)
    """Default values of ``${NAME}`` variables."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Architecture of stages that do not inherit one from a parent stage."""
    ds_config: str = "ds_configs/cpu_fp32.json"
    """DeepSpeed config of every stage (a shipped name or a path)."""
    launcher: Launcher = "deepspeed"
    """How each stage process is started."""
    nproc: int = 1
    """Processes (GPUs) per stage; ``gpus`` is accepted as an alias."""
    defaults: dict[str, Any] = field(default_factory=dict)
    """StageConfig fields applied to every training stage (before kind defaults and stage overrides)."""
    kind_defaults: dict[str, Any] = field(default_factory=dict)
    """Per kind (head / distill / ssl) StageConfig fields, applied after ``defaults``."""
    figure_tiles: int = 4
    """Test tiles per row in results.png (0: no figure)."""

    def __post_init__(self) -> None:
        if self.nproc < 1:
            raise ValueError("nproc must be >= 1")
        if self.launcher == "python" and self.nproc > 1:
            raise ValueError("launcher 'python' runs one process; use deepspeed or torchrun for nproc > 1")
        unknown = sorted(set(self.kind_defaults) - {"head", "distill", "ssl"})
        if unknown:
            raise ValueError(f"kind_defaults: unknown kind(s) {unknown}; use head, distill or ssl")
        if self.figure_tiles < 0:
            raise ValueError("figure_tiles must be >= 0")


def substitute(value: Any, variables: dict[str, str], where: str) -> Any:
    """Replace ``${NAME}`` in every string of a nested structure; an undefined variable is an error."""
    if isinstance(value, str):
        def repl(match: re.Match) -> str:
            name = match.group(1)
            if name not in variables:
                raise RecipeError(f"{where}: variable ${{{name}}} is not set (pass --var {name}=VALUE)")
            return str(variables[name])
        return _VAR.sub(repl, value)
    if isinstance(value, dict):
        return {k: substitute(v, variables, where) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, variables, where) for v in value]
    return value


def _variables(raw: dict[str, Any], cli: dict[str, str], path: Path) -> dict[str, str]:
    """Recipe defaults, overridden by the environment, overridden by the command line."""
    defaults = raw.get("vars") or {}
    if not isinstance(defaults, dict):
        raise RecipeError(f"{path}: 'vars' must be a mapping")
    return {**{str(k): str(v) for k, v in defaults.items()}, **os.environ, **cli}


def resolve_path(value: str | None, base: Path) -> str | None:
    """An absolute path: ``value`` as given when absolute, else relative to ``base`` (the recipe's folder)."""
    if value is None or value == "":
        return value
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def _datasets(raw: Any, path: Path) -> dict[str, DatasetSpec]:
    """Parse the ``datasets`` mapping (a bare string value is a shard folder)."""
    if not isinstance(raw, dict) or not raw:
        raise RecipeError(f"{path}: 'datasets' must be a non-empty mapping of name -> shard folder or spec")
    out = {}
    for name, spec in raw.items():
        spec = {"path": spec} if isinstance(spec, str) else spec
        if not isinstance(spec, dict):
            raise RecipeError(f"{path}: dataset {name!r}: expected a shard folder or a mapping")
        try:
            out[str(name)] = from_dict(DatasetSpec, spec, where=f"{path}: dataset {name!r}")
        except ConfigError as exc:
            raise RecipeError(str(exc)) from None
    return out


def _resolve_dataset_paths(recipe: Recipe, base: Path, run_dir: Path) -> None:
    """Make every dataset path absolute; shard-built datasets default to ``<run>/shards/<name>``."""
    for name, ds in recipe.datasets.items():
        ds.path = resolve_path(ds.path, base) if ds.path else str(run_dir / "shards" / name)
        if ds.shard is not None:
            for key in ("images", "masks", "unlabeled", "classes"):
                setattr(ds.shard, key, resolve_path(getattr(ds.shard, key), base))


def load_recipe(path: str | Path, variables: dict[str, str] | None = None, out: str | None = None) -> Recipe:
    """Read, substitute and type-check a recipe; paths come back absolute. Raises RecipeError naming the file."""
    path = Path(path)
    try:
        raw = read_mapping(path)
    except ConfigError as exc:
        raise RecipeError(str(exc)) from None
    raw = substitute(raw, _variables(raw, dict(variables or {}), path), str(path))
    if "gpus" in raw:
        if "nproc" in raw:
            raise RecipeError(f"{path}: give 'gpus' or 'nproc', not both")
        raw["nproc"] = raw.pop("gpus")
    if not isinstance(raw.get("stages"), list) or not raw["stages"]:
        raise RecipeError(f"{path}: 'stages' must be a non-empty list")
    datasets = _datasets(raw.get("datasets"), path)
    try:
        recipe = from_dict(Recipe, {**raw, "datasets": {}}, where=str(path))
    except ConfigError as exc:
        raise RecipeError(str(exc)) from None
    recipe.datasets = datasets
    recipe.name = recipe.name or path.stem
    base = path.resolve().parent
    run_dir = Path(out or resolve_path(recipe.out, base) or Path("runs") / recipe.name).resolve()
    recipe.out = str(run_dir)
    _resolve_dataset_paths(recipe, base, run_dir)
    shipped_or_local = Path(recipe.ds_config)
    if not shipped_or_local.is_absolute() and (base / shipped_or_local).is_file():
        recipe.ds_config = str((base / shipped_or_local).resolve())
    for stage in recipe.stages:
        stage.weights = resolve_path(stage.weights, base)
    if recipe.model.pretrained not in (None, "imagenet"):
        recipe.model.pretrained = resolve_path(recipe.model.pretrained, base)
    return recipe
