"""Every ready config under examples/ is valid for its recipe (a renamed or mistyped key fails here, not for a user)."""
from pathlib import Path

import pytest

from tunesmith.config import build_config, read_yaml

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.yaml"))


def recipe_config(name: str):
    if name.startswith("sft"):
        from tunesmith.recipes.sft import SFTConfig
        return SFTConfig
    if name.startswith("dpo"):
        from tunesmith.recipes.dpo import DPOConfig
        return DPOConfig
    if name.startswith("spin"):
        from tunesmith.recipes.spin import SPINConfig
        return SPINConfig
    if name.startswith("classify"):
        from tunesmith.recipes.classify import ClassifyConfig
        return ClassifyConfig
    raise AssertionError(f"no recipe known for example {name}")


def test_there_are_examples_for_each_recipe():
    prefixes = {p.name.split("_")[0].split(".")[0] for p in EXAMPLES}
    assert {"sft", "spin", "dpo", "classify"} <= prefixes


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_config_builds(path):
    values = read_yaml(path)
    values["use_cpu"] = True  # bf16 examples are meant for GPUs; the keys are what is checked here
    values.pop("bf16", None)
    cfg = build_config(recipe_config(path.name), values, source=str(path))
    assert cfg.training.output_dir
