"""Every shipped recipe validates; bad keys are named with the valid alternatives."""

from __future__ import annotations

from pathlib import Path

import pytest

from quantlab.recipe import Recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipes_validate(path):
    r = Recipe.from_yaml(path)
    assert r.plan.planner in {"luq", "budget", "uniform"}


def test_unknown_key_names_key_and_valid_ones(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("plan: {planer: luq}\n")
    with pytest.raises(ValueError, match=r"(?s)r.yaml.*unknown key 'plan.planer'.*valid keys here:.*planner"):
        Recipe.from_yaml(bad)


def test_overrides_and_missing_file(tmp_path):
    r = Recipe.from_yaml(RECIPES[0], overrides={"calibration.num_samples": 8})
    assert r.calibration.num_samples == 8
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        Recipe.from_yaml(tmp_path / "nope.yaml")


def test_recipe_reference_is_current():
    """docs/recipes.md is generated from the pydantic models; regenerate it when a field changes."""
    from quantlab.recipe_reference import reference

    doc = Path(__file__).resolve().parents[1] / "docs" / "recipes.md"
    assert doc.read_text() == reference(), "run: python -m quantlab.recipe_reference > docs/recipes.md"
    for key in ("num_samples", "alpha", "entropy_k", "planner", "budget_gb", "sensitivity_samples", "format",
                "tasks", "group_size", "act_order", "max_salient"):
        assert f"`{key}`" in doc.read_text(), key
