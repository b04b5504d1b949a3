"""The public API: every exported name resolves, ``import evil_moe`` is cheap, works
without ``transformers``, and ``docs/api.md`` documents every exported name."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

import evil_moe

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = ("routing", "modules", "models", "data", "train", "eval", "recipes")


def _python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )


def test_every_exported_name_resolves():
    assert evil_moe.__all__ == sorted(set(evil_moe.__all__))
    for name in evil_moe.__all__:
        assert getattr(evil_moe, name) is not None, name
    for package in SUBPACKAGES:
        module = importlib.import_module(f"evil_moe.{package}")
        for name in module.__all__:
            assert getattr(module, name) is not None, f"evil_moe.{package}.{name}"
        assert set(module.__all__) >= {n for n, p in evil_moe._EXPORTS.items() if p == package}


def test_top_level_names_are_the_subpackage_objects():
    from evil_moe.models.hf import inject
    from evil_moe.modules.ablation import ablated
    from evil_moe.routing.labels import RouteLabel

    assert evil_moe.inject is inject
    assert evil_moe.ablated is ablated
    assert evil_moe.RouteLabel is RouteLabel
    with pytest.raises(AttributeError, match="no_such_name"):
        evil_moe.no_such_name  # noqa: B018


def test_import_is_light_and_lists_the_api():
    result = _python(
        "import sys, evil_moe; print(evil_moe.__all__); "
        "print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    assert result.returncode == 0, result.stderr
    names, loaded = result.stdout.strip().splitlines()
    assert "'inject'" in names and "'RouteLabel'" in names
    assert loaded == "False False"


def test_works_without_transformers():
    code = """
import sys
sys.modules["transformers"] = None  # any import of transformers now raises ImportError
import evil_moe
for name in evil_moe.__all__:
    if name not in ("RoutedTrainer", "RoutedStepCallback"):
        getattr(evil_moe, name)
for name in ("RoutedTrainer", "RoutedStepCallback"):
    try:
        getattr(evil_moe, name)
    except ImportError:
        print(name, "needs transformers")
"""
    result = _python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == [
        "RoutedTrainer needs transformers",
        "RoutedStepCallback needs transformers",
    ]


def test_the_api_page_documents_every_exported_name():
    page = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    missing = [n for n in evil_moe.__all__ if f"`{n}" not in page]
    assert not missing, f"docs/api.md does not mention {missing}"
