"""Recipes: whole stage chains from one YAML file (``distseg run``), their results table and the demo."""
from distseg.pipeline.plan import Plan, PlannedStage, build_plan
from distseg.pipeline.recipe import Recipe, RecipeError, StageSpec, load_recipe
from distseg.pipeline.runner import StageFailed, run_recipe

__all__ = ["Plan", "PlannedStage", "Recipe", "RecipeError", "StageFailed", "StageSpec", "build_plan", "load_recipe",
           "run_recipe"]
