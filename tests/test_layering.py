"""The layering rules are contracts: import-linter checks them on the real tree.

The contracts live in pyproject.toml ``[tool.importlinter]`` (``make lint`` runs
``lint-imports`` on them too). The first test runs them on this checkout; the
others run the same contracts on a throwaway tree in tmp_path, to show that the
recorded exceptions are all they let through and that every forbidden import
breaks its contract, directly or through another package.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = "from importlinter.cli import lint_imports_command; lint_imports_command()"


def importlinter_config() -> dict[str, Any]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        config: dict[str, Any] = tomllib.load(f)["tool"]["importlinter"]
    return config


CONFIG = importlinter_config()
CONTRACTS: list[dict[str, Any]] = CONFIG["contracts"]


def lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    # Run from cwd, with its pyproject.toml (lint-imports puts cwd first on sys.path,
    # so a tree there shadows the installed packages); no cache, so nothing is
    # written beside the tree; plain,
    # wide output, so the report reads the same on a terminal and in CI.
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE")}
    env.update(NO_COLOR="1", COLUMNS="200")
    return subprocess.run(
        [sys.executable, "-c", LINT_IMPORTS, "--no-cache"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def write_config(tree: Path) -> None:
    """pyproject.toml's import-linter section, as it is, into ``tree``'s pyproject.toml."""
    lines = ["[tool.importlinter]"]
    lines += [f"{k} = {toml_value(v)}" for k, v in CONFIG.items() if k != "contracts"]
    for contract in CONTRACTS:
        lines += ["", "[[tool.importlinter.contracts]]"]
        lines += [f"{k} = {toml_value(v)}" for k, v in contract.items()]
    (tree / "pyproject.toml").write_text("\n".join(lines) + "\n")


def add_module(tree: Path, module: str, *imports: str) -> None:
    """Create ``module`` (and its packages) under ``tree``, importing ``imports``."""
    parts = module.split(".")
    for i in range(1, len(parts) + 1):
        package = tree.joinpath(*parts[:i])
        package.mkdir(exist_ok=True)
        (package / "__init__.py").touch()
    init = tree.joinpath(*parts, "__init__.py")
    with init.open("a") as f:
        f.writelines(f"import {name}\n" for name in imports)


def exceptions_tree(tree: Path) -> None:
    """The root packages, holding exactly the imports the contracts ignore."""
    write_config(tree)
    for root in CONFIG["root_packages"]:
        add_module(tree, root)
    for contract in CONTRACTS:
        for rule in contract.get("ignore_imports", []):
            importer, imported = (side.strip() for side in rule.split("->"))
            add_module(tree, importer, imported)
            if imported.split(".")[0] in CONFIG["root_packages"]:
                add_module(tree, imported)
    # The path by which the agent reaches edgefleet.build today.
    add_module(tree, "agent.runtime", "edgefleet.build")


def report(result: subprocess.CompletedProcess[str]) -> str:
    return f"lint-imports exited {result.returncode}\n{result.stdout}\n{result.stderr}"


def test_the_tree_keeps_every_layering_contract() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, report(result)
    assert f"Contracts: {len(CONTRACTS)} kept, 0 broken." in result.stdout, report(result)


def test_the_recorded_exceptions_are_allowed(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    exceptions_tree(tree)
    result = lint_imports(tree)
    assert result.returncode == 0, report(result)


@pytest.mark.parametrize("contract", CONTRACTS, ids=[c["source_modules"][0] for c in CONTRACTS])
def test_every_forbidden_import_breaks_its_contract(tmp_path: Path, contract: dict) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    exceptions_tree(tree)
    (source,) = contract["source_modules"]
    for forbidden in contract["forbidden_modules"]:
        if forbidden in CONFIG["root_packages"]:
            # Indirectly: through a module of an allowed package (edgefleet for all but
            # edgefleet itself, whose contract forbids every other root package).
            hop = "edgefleet" if source != "edgefleet" else f"{source}.inner"
            add_module(tree, f"{hop}.reaches_{forbidden}", f"{forbidden}.anything")
            add_module(tree, f"{forbidden}.anything")
            add_module(tree, f"{source}.uses_{forbidden}", f"{hop}.reaches_{forbidden}")
        else:
            add_module(tree, f"{source}.uses_{forbidden}", forbidden)
    result = lint_imports(tree)
    assert result.returncode == 1, report(result)
    assert f"{contract['name']} BROKEN" in " ".join(result.stdout.split()), report(result)
    for forbidden in contract["forbidden_modules"]:
        assert f"{source} is not allowed to import {forbidden}:" in result.stdout, report(result)


def test_the_agent_may_not_import_the_server(tmp_path: Path) -> None:
    """The rule in issue 10's own words, as a one-line change to the agent."""
    tree = tmp_path / "tree"
    tree.mkdir()
    exceptions_tree(tree)
    add_module(tree, "agent.errors", "server")
    result = lint_imports(tree)
    assert result.returncode == 1, report(result)
    assert "agent is not allowed to import server:" in result.stdout, report(result)
    assert "agent.errors -> server" in result.stdout, report(result)
