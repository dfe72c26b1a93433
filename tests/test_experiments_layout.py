"""The bundled experiments as files a researcher reads: every name is findable by grep in
`experiments/`, sizes and stages resolve through the registry, and the distribution ships them."""

import fnmatch
import re
import tomllib
from pathlib import Path

import pytest

from moma_jax import registry
from moma_jax.config import ConfigError
from moma_jax.registry import register_sizes, stage_name

ROOT = Path(__file__).resolve().parents[1]
SOURCE = "\n".join(p.read_text() for p in sorted((ROOT / "experiments").glob("*.py")))


def _bundled() -> list[str]:
    return [n for n in registry.names() if registry.source(n).split(".")[0] == "experiments"]


def test_the_headline_is_written_in_experiments():
    assert "moma_4t4i_tiny" in SOURCE


@pytest.mark.parametrize("name", _bundled())
def test_every_name_or_its_architecture_is_written_in_experiments(name):
    """A name is written whole (`@register("moma_4t4i_c2_tiny")`) or as its architecture
    (`@register_sizes("moma_4t4i", ...)`, maybe with a stage suffix)."""
    arch = re.sub(r"_((joint_)?aux_)?[^_]+$", "", name)
    assert f'"{name}"' in SOURCE or f'"{arch}"' in SOURCE


def test_sizes_and_stages_resolve_and_unknown_names_list_close_matches():
    def stage(cfg, size):
        """a test stage."""
        return cfg

    @register_sizes("layout_test_arch", ("tiny", "big"), stages={"st": stage})
    def layout_test_arch(size):
        """a test architecture."""
        return registry.get("dense_tiny")

    names = set(registry.names())
    assert {"layout_test_arch_tiny", "layout_test_arch_st_big"} <= names
    assert registry.source("layout_test_arch_tiny") == __name__
    assert registry.describe("layout_test_arch_st_tiny").startswith("layout_test_arch_tiny, ")
    assert registry.get("layout_test_arch_big").name == "layout_test_arch_big"
    assert stage_name("moma_4t4i_tiny") == "moma_4t4i_aux_tiny"
    with pytest.raises(ConfigError, match="moma_4t4i_aux_tiny"):
        registry.get("moma_4t4i_aux_tiyn")


def test_the_distribution_ships_the_experiments():
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"
    ]["find"]["include"]
    # setuptools' find: every folder with an __init__.py whose dotted name matches a pattern.
    found = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in ROOT.glob("*/**/__init__.py")
        if not p.parts[len(ROOT.parts)].startswith(".")
    }
    packages = {p for p in found if any(fnmatch.fnmatchcase(p, pat) for pat in include)}
    assert {"moma_jax", "moma_jax.model", "experiments"} <= packages
    assert not any(p.startswith(("tests", "scripts")) for p in packages)
