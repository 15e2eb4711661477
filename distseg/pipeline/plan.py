"""Turn a recipe into an ordered, fully validated plan: stage configs, folders and launch commands.

Everything that can be checked without training is checked here, so a bad recipe fails before the first stage
starts: stage references, cycles, datasets, class maps between hops, and every StageConfig.
"""
from __future__ import annotations

import copy
import fnmatch
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distseg.config import ConfigError, from_dict, to_dict
from distseg.data.classes import ClassMap
from distseg.pipeline.recipe import EVAL, EvalOptions, Recipe, RecipeError, StageSpec
from distseg.stages.config import StageConfig
from distseg.stages.registry import get_kind, kind_names

STAGE_MODULE = "distseg.stages"
"""Every stage is launched as ``python -m distseg.stages KIND`` (or its deepspeed/torchrun spelling)."""
_STRUCTURAL = ("kind", "out", "parent")


@dataclass
class PlannedStage:
    """One stage, resolved: where it writes, what it reads and how it is launched."""

    spec: StageSpec
    folder: Path
    parent_path: str | None
    """The folder or weights file the stage starts from (or evaluates)."""
    config: StageConfig | None = None
    """Training stages: the resolved StageConfig written to ``configs/<name>.yaml``."""
    identity: dict[str, Any] | None = None
    """Training stages: ``config.identity(world size)``, what a finished or interrupted folder must match."""
    eval_options: EvalOptions | None = None
    adapt_bn: list[str] = field(default_factory=list)
    """Eval stages: the shard folders the model's BatchNorm statistics are re-estimated on first (``unlabeled``)."""
    config_file: Path | None = None
    data_path: str = ""
    command: list[str] = field(default_factory=list)
    display: str = ""
    """The command as a user would type it."""

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def kind(self) -> str:
        return self.spec.kind


@dataclass
class Plan:
    """The ordered stages of one recipe run."""

    recipe: Recipe
    source: Path
    run_dir: Path
    stages: list[PlannedStage]
    warnings: list[str] = field(default_factory=list)

    def by_name(self) -> dict[str, PlannedStage]:
        return {s.name: s for s in self.stages}

    def selected(self, patterns: list[str]) -> list[PlannedStage]:
        """The stages ``--only`` asks for, with every ancestor they start from, in plan order.

        A pattern (shell-style: ``ft*``) matches a stage's own name (``ft.s1``) or its recipe name (``ft``, every
        seed's copy). Ancestors come along because a stage cannot start without its parent's model; finished ones
        are skipped as in a full run. A pattern that matches nothing is an error, not a silent no-op."""
        if not patterns:
            return list(self.stages)
        names = self.by_name()
        chosen: set[str] = set()
        for pattern in patterns:
            hits = [s.name for s in self.stages
                    if fnmatch.fnmatchcase(s.name, pattern) or fnmatch.fnmatchcase(recipe_name(s.spec), pattern)]
            if not hits:
                recipe_names = sorted({recipe_name(s.spec) for s in self.stages})
                raise RecipeError(f"{self.source}: --only {pattern!r} matches no stage (stages: {recipe_names})")
            for name in hits:
                while name in names and name not in chosen:
                    chosen.add(name)
                    name = names[name].spec.parent
        return [s for s in self.stages if s.name in chosen]


def recipe_name(spec: StageSpec) -> str:
    """The name a stage has in the recipe: its planned name without the seed suffix ``.s<seed>``."""
    suffix = f".s{spec.seed}"
    return spec.name[:-len(suffix)] if spec.seed is not None and spec.name.endswith(suffix) else spec.name


def _fail(source: Path, stage: str | None, message: str) -> RecipeError:
    where = f"{source}: stage {stage!r}" if stage else str(source)
    return RecipeError(f"{where}: {message}")


def order_stages(recipe: Recipe, source: Path) -> list[StageSpec]:
    """Check names and references, and return the stages parents-first (listing order otherwise kept)."""
    names: dict[str, StageSpec] = {}
    for spec in recipe.stages:
        if spec.name in names:
            raise _fail(source, spec.name, "duplicate stage name")
        names[spec.name] = spec
    for spec in recipe.stages:
        if spec.parent and spec.parent not in names:
            raise _fail(source, spec.name, f"unknown stage {spec.parent!r} in 'parent' (stages: {sorted(names)})")
        for key, refs in (("data", [spec.data] if spec.data else []), ("unlabeled", spec.unlabeled)):
            for ref in refs:
                if ref not in recipe.datasets:
                    raise _fail(source, spec.name, f"unknown dataset {ref!r} in {key!r} "
                                                   f"(datasets: {sorted(recipe.datasets)})")
        if not spec.data:
            raise _fail(source, spec.name, "no 'data' (a dataset name) given")
        if spec.unlabeled and spec.kind != EVAL and not get_kind(spec.kind).unlabelled:
            readers = [k for k in kind_names() if get_kind(k).unlabelled]
            raise _fail(source, spec.name, f"'unlabeled' only applies to eval (AdaBN) and to kinds that read a pool "
                                           f"({readers})")
    ordered: list[StageSpec] = []
    state: dict[str, str] = {}

    def visit(spec: StageSpec, path: list[str]) -> None:
        if state.get(spec.name) == "done":
            return
        if state.get(spec.name) == "open":
            cycle = path[path.index(spec.name):] + [spec.name]
            raise _fail(source, spec.name, f"cycle in stage parents: {' -> '.join(cycle)}")
        state[spec.name] = "open"
        if spec.parent:
            visit(names[spec.parent], path + [spec.name])
        state[spec.name] = "done"
        ordered.append(spec)

    for spec in recipe.stages:
        visit(spec, [])
    return ordered


def dataset_class_maps(recipe: Recipe, source: Path) -> dict[str, ClassMap | None]:
    """The class map of every dataset: from the class file of its shard block, else from its manifest.

    None when it cannot be known yet (data absent in a dry run, or an unlabelled-only dataset).
    """
    from distseg.data.errors import DataError
    from distseg.data.manifest import read_manifest
    from distseg.data.synthetic import class_map_dict

    maps: dict[str, ClassMap | None] = {}
    for name, ds in recipe.datasets.items():
        try:
            if ds.synthetic is not None:
                maps[name] = ClassMap.from_dict(class_map_dict(ds.synthetic.domain))
            elif ds.shard is not None and ds.shard.classes and Path(ds.shard.classes).is_file():
                maps[name] = ClassMap.from_file(ds.shard.classes)
            elif ds.shard is None and (Path(ds.path) / "manifest.json").is_file():
                labelled = read_manifest(ds.path).get("class_map") is not None
                maps[name] = ClassMap.from_manifest(ds.path) if labelled else None
            else:
                maps[name] = None
        except DataError as exc:
            raise _fail(source, None, f"dataset {name!r}: {exc}") from None
    return maps


def missing_inputs(recipe: Recipe) -> list[str]:
    """Datasets and external weights that do not exist (fatal for a real run, warnings for a dry run)."""
    problems = []
    for name, ds in recipe.datasets.items():
        if ds.synthetic is not None:
            continue  # generated by the run itself
        if ds.shard is None:
            if not (Path(ds.path) / "manifest.json").is_file():
                problems.append(f"dataset {name!r}: {ds.path} is not a shard folder (no manifest.json)")
            continue
        for key in ("images", "masks", "unlabeled", "classes"):
            value = getattr(ds.shard, key)
            if value and not Path(value).exists():
                problems.append(f"dataset {name!r}: shard.{key} {value} does not exist")
    for spec in recipe.stages:
        if spec.weights and not Path(spec.weights).exists():
            problems.append(f"stage {spec.name!r}: weights {spec.weights} do not exist")
    return problems


def check_class_flow(order: list[StageSpec], maps: dict[str, ClassMap | None], source: Path) -> None:
    """A stage must see the class set its parent predicts, unless its kind ``changes_classes`` (a head stage)."""
    produced: dict[str, ClassMap | None] = {}
    for spec in order:
        data_map = maps.get(spec.data)
        kind = None if spec.kind == EVAL else get_kind(spec.kind)
        if spec.parent and not (kind and kind.changes_classes):
            before = produced.get(spec.parent)
            if before is not None and data_map is not None and before != data_map:
                raise _fail(source, spec.name,
                            f"class-map mismatch: parent {spec.parent!r} predicts {before.names} but dataset "
                            f"{spec.data!r} has {data_map.names}; add a head stage on {spec.data!r} between them")
        produced[spec.name] = data_map if kind and kind.labelled else None


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Deep merge: mappings merge key by key, anything else replaces."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _layers(recipe: Recipe, spec: StageSpec) -> list[tuple[str, dict[str, Any]]]:
    """The recipe layers of a training stage, in order; ``defaults`` keep only their own kind's options section."""
    foreign = set(kind_names()) - {spec.kind}
    defaults = {k: v for k, v in (recipe.defaults or {}).items() if k not in foreign}
    return [("defaults", defaults), ("kind_defaults", recipe.kind_defaults.get(spec.kind) or {}),
            ("overrides", spec.overrides or {})]


def stage_config(recipe: Recipe, spec: StageSpec, folder: Path, parent_path: str | None, source: Path) -> StageConfig:
    """The StageConfig of a training stage: model and ds_config, then defaults, kind defaults, overrides."""
    layers = _layers(recipe, spec)
    for layer_name, layer in layers:
        bad = [k for k in _STRUCTURAL if k in layer] + [f"data.{k}" for k in ("shards", "unlabeled")
                                                        if k in layer.get("data", {})]
        if bad:
            raise _fail(source, spec.name, f"{layer_name} may not set {bad}: use the stage's name, parent/weights "
                                           f"and data/unlabeled fields")
    data = {"model": to_dict(recipe.model), "ds_config": recipe.ds_config}
    for _, layer in layers:
        data = _merge(data, layer)
    datasets = {"shards": recipe.datasets[spec.data].path}
    if spec.unlabeled:
        datasets["unlabeled"] = [recipe.datasets[name].path for name in spec.unlabeled]
    data = _merge(data, {"kind": spec.kind, "out": str(folder), "parent": parent_path, "data": datasets})
    try:
        cfg = from_dict(StageConfig, data, where=f"{source}: stage {spec.name!r}")
    except ConfigError as exc:
        raise RecipeError(str(exc)) from None
    try:
        get_kind(spec.kind).check(cfg)
    except ValueError as exc:
        raise _fail(source, spec.name, str(exc)) from None
    return cfg


def launcher_args(recipe: Recipe) -> list[str]:
    """The launcher's own arguments for ``nproc`` processes per node on ``launch.num_nodes`` nodes."""
    n, opts = str(recipe.nproc), recipe.launch
    if recipe.launcher == "deepspeed":
        args = ["--num_gpus", n]
        if opts.num_nodes > 1:
            args += ["--num_nodes", str(opts.num_nodes), "--hostfile", str(opts.hostfile)]
        for flag, value in (("--master_addr", opts.master_addr), ("--master_port", opts.master_port)):
            args += [flag, str(value)] if value is not None else []
        return args + list(opts.extra_args) + ["--module"]
    if recipe.launcher == "torchrun":
        args = ["--nproc_per_node", n]
        if opts.num_nodes > 1:
            args += ["--nnodes", str(opts.num_nodes)]
            if opts.rdzv_endpoint:
                args += ["--rdzv_backend", opts.rdzv_backend or "c10d", "--rdzv_endpoint", opts.rdzv_endpoint]
                args += ["--rdzv_id", opts.rdzv_id] if opts.rdzv_id else []
            else:
                args += ["--node_rank", str(opts.node_rank), "--master_addr", str(opts.master_addr)]
                args += ["--master_port", str(opts.master_port)] if opts.master_port is not None else []
        return args + list(opts.extra_args) + ["-m"]
    return ["-m"]


def launch_command(recipe: Recipe, kind: str, args: list[str]) -> tuple[list[str], str]:
    """(argv to run, the same command as printed): ``-m distseg.stages KIND`` under deepspeed, torchrun or python."""
    module = [STAGE_MODULE, kind]
    own = launcher_args(recipe)
    if recipe.launcher == "deepspeed":
        exe = Path(sys.executable).with_name("deepspeed")
        prefix, shown = [str(exe) if exe.exists() else "deepspeed", *own], ["deepspeed", *own]
    elif recipe.launcher == "torchrun":
        prefix, shown = [sys.executable, "-m", "torch.distributed.run", *own], ["torchrun", *own]
    else:
        prefix, shown = [sys.executable, *own], ["python", *own]
    return prefix + module + args, shlex.join(shown + module + args)


def _plan_stage(recipe: Recipe, spec: StageSpec, run_dir: Path, source: Path) -> PlannedStage:
    folder = run_dir / spec.name
    parent_path = str(run_dir / spec.parent) if spec.parent else spec.weights
    stage = PlannedStage(spec=spec, folder=folder, parent_path=parent_path,
                         data_path=recipe.datasets[spec.data].path)
    if spec.kind == EVAL:
        try:
            stage.eval_options = from_dict(EvalOptions, spec.overrides, where=f"{source}: stage {spec.name!r}")
        except ConfigError as exc:
            raise RecipeError(str(exc)) from None
        opts = stage.eval_options
        args = [parent_path, "--data", stage.data_path, "--split", opts.split, "--batch-size", str(opts.batch_size),
                "--sliding" if opts.sliding else "--no-sliding", "--tile", str(opts.tile), "--out", str(folder)]
        stage.adapt_bn = [recipe.datasets[name].path for name in spec.unlabeled]
        args += [a for path in stage.adapt_bn for a in ("--adapt-bn", path)]
    else:
        stage.config = stage_config(recipe, spec, folder, parent_path, source)
        try:
            stage.identity = stage.config.identity(recipe.world_size)
        except ConfigError as exc:
            raise _fail(source, spec.name, str(exc)) from None
        stage.config_file = run_dir / "configs" / f"{spec.name}.yaml"
        args = ["--config", str(stage.config_file), "--out", str(folder)]
    stage.command, stage.display = launch_command(recipe, spec.kind, args)
    return stage


def build_plan(recipe: Recipe, source: str | Path, *, require_inputs: bool = True) -> Plan:
    """Validate the recipe and resolve every stage. ``require_inputs=False`` (dry run) turns missing data into
    warnings."""
    source = Path(source)
    run_dir = Path(recipe.out)
    order = order_stages(recipe, source)
    warnings = missing_inputs(recipe)
    if warnings and require_inputs:
        raise _fail(source, None, "; ".join(warnings))
    maps = dataset_class_maps(recipe, source)
    check_class_flow(order, maps, source)
    stages = [_plan_stage(recipe, spec, run_dir, source) for spec in order]
    return Plan(recipe=recipe, source=source, run_dir=run_dir, stages=stages, warnings=warnings)
