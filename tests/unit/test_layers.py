"""The package map has no import that runs upward (README "Layout").

Every ``import rocoin...`` in ``src/`` (also the ones inside functions) is checked against the
layers below: a package may import itself and the packages it lists, nothing else.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "rocoin"

#: Which packages each package may import (besides itself), bottom to top.
ALLOWED: dict[str, set[str]] = {
    "contracts": set(),
    "logs": {"contracts"},
    "models": {"contracts"},
    "data": {"contracts"},
    "profiles": {"contracts", "models"},
    "planning": {"contracts"},
    "simulation": {"contracts", "planning"},
    "distillation": {"contracts", "models", "data", "planning"},
    "export": {"contracts", "models", "data", "distillation"},
    "runtime.transport": {"contracts", "logs"},
    "runtime.device": {"contracts", "logs", "runtime.transport"},
    # the source re-plans which device serves which group as the fleet changes (issue 14): it uses
    # the planner's pure numpy re-plan, never training code
    "runtime.source": {"contracts", "logs", "runtime.transport", "planning"},
    "runtime.api": {"contracts", "logs", "runtime.transport", "runtime.source", "planning"},
    "runtime.cluster": {"contracts", "logs", "runtime.transport", "runtime.device", "runtime.source", "runtime.api", "planning"},
    "runtime": {"contracts", "logs"},
    "pipeline": {
        "contracts",
        "logs",
        "models",
        "data",
        "profiles",
        "planning",
        "simulation",
        "distillation",
        "export",
        "runtime.transport",
        "runtime.device",
        "runtime.source",
        "runtime.api",
        "runtime.cluster",
    },  # fmt: skip
}
ALLOWED["experiments"] = ALLOWED["pipeline"] | {"pipeline"}
#: Single modules a layer may import from a package above it: the detector head's box decoding is
#: numpy only (tests/unit/test_detector.py checks it never imports torch); training's evaluation
#: and the source both decode with it, so what the source answers is what mAP was measured on.
ALLOWED_MODULES: dict[str, set[str]] = {"runtime.source": {"rocoin.models.boxes"}}
#: The command line sits on top and may import anything.
TOP = "cli"


def _package(module: str) -> str:
    """``rocoin.runtime.source.gather`` -> ``runtime.source``; ``rocoin.planning.plan`` -> ``planning``."""
    parts = module.split(".")[1:]
    if not parts:
        return ""  # the root package itself (only ``__version__``)
    if parts[0] == "runtime" and len(parts) > 1 and f"runtime.{parts[1]}" in ALLOWED:
        return f"runtime.{parts[1]}"
    return parts[0]


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.startswith("rocoin")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("rocoin"):
            if node.module == "rocoin":  # ``from rocoin import x``: x is a package unless it is __version__
                found += [(node.lineno, f"rocoin.{alias.name}") for alias in node.names if alias.name != "__version__"]
            else:
                found.append((node.lineno, node.module))
    return found


def _modules() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py") if "protocol" not in p.parts)


def test_every_package_has_a_layer():
    packages = {_package("rocoin." + ".".join(p.relative_to(SRC).with_suffix("").parts)) for p in _modules()}
    packages -= {"", "__init__", TOP}
    assert packages <= set(ALLOWED), f"packages without a layer in this test: {sorted(packages - set(ALLOWED))}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(SRC)))
def test_no_import_runs_upward(path: Path):
    here = _package("rocoin." + ".".join(path.relative_to(SRC).with_suffix("").parts))
    if here in ("", "__init__", TOP):
        return
    upward = [
        f"line {line}: {module}"
        for line, module in _imports(path)
        if (there := _package(module)) not in ("", here) and there not in ALLOWED[here] and module not in ALLOWED_MODULES.get(here, set())
    ]
    assert not upward, f"{path.relative_to(SRC)} ({here}) imports upward: {upward}"


def test_contracts_import_only_numpy_pydantic_yaml():
    allowed_third_party = {"numpy", "pydantic", "yaml", "yaml_rs"}  # yaml_rs: the fast reader of plain fleet files
    for path in (SRC / "contracts").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            for name in names:
                top = name.split(".")[0]
                if top == "rocoin":
                    assert name == "rocoin" or name.startswith("rocoin.contracts"), f"{path.name} imports {name}"
                else:
                    import sys

                    assert top in allowed_third_party or top in sys.stdlib_module_names, f"{path.name} imports {name}"
