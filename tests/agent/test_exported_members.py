"""The public surface of agent.protocol is explicit (STYLE rule 20; httpx's test of the same name).

- each public module's ``__all__`` lists exactly the public names it defines;
- the package re-exports, under ``__all__``, only names its modules export, as the same objects;
- every error it re-exports descends from ``ProtocolError``;
- importing it pulls in neither cryptography nor numpy (the device-light wire format).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import subprocess
import sys
import types

import pytest

import agent.protocol

MODULES = sorted(m.name for m in pkgutil.iter_modules(agent.protocol.__path__)
                 if not m.name.startswith("_"))
PRIVATE_MODULES = sorted(m.name for m in pkgutil.iter_modules(agent.protocol.__path__)
                         if m.name.startswith("_"))


def _public_definitions(module: types.ModuleType) -> set[str]:
    """Names bound at the top level of the module's source (def, class, assignment), public."""
    tree = ast.parse(inspect.getsource(module))
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {n for n in names if not n.startswith("_")}


def test_the_expected_modules_are_checked() -> None:
    assert {"manifest", "messages", "profiles", "signed", "topics"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES + PRIVATE_MODULES, ids=MODULES + PRIVATE_MODULES)
def test_module_all_matches_its_public_definitions(name: str) -> None:
    module = importlib.import_module(f"agent.protocol.{name}")
    assert sorted(module.__all__) == sorted(_public_definitions(module))
    assert len(set(module.__all__)) == len(module.__all__), "duplicates in __all__"


def test_package_all_matches_its_public_members() -> None:
    members = {name for name, value in vars(agent.protocol).items()
               if not name.startswith("_") and not isinstance(value, types.ModuleType)}
    assert sorted(agent.protocol.__all__) == sorted(members)


@pytest.mark.parametrize("name", agent.protocol.__all__)
def test_package_reexports_a_module_export(name: str) -> None:
    value = getattr(agent.protocol, name)
    homes = [m for m in MODULES + PRIVATE_MODULES
             if name in importlib.import_module(f"agent.protocol.{m}").__all__]
    assert len(homes) == 1, f"{name} is exported by {homes}, expected exactly one module"
    assert getattr(importlib.import_module(f"agent.protocol.{homes[0]}"), name) is value


ERRORS = sorted(n for n in agent.protocol.__all__
                if isinstance(getattr(agent.protocol, n), type)
                and issubclass(getattr(agent.protocol, n), BaseException))


@pytest.mark.parametrize("name", ERRORS, ids=ERRORS)
def test_every_exported_error_descends_from_the_root(name: str) -> None:
    error = getattr(agent.protocol, name)
    assert issubclass(error, agent.protocol.ProtocolError)
    assert issubclass(error, ValueError)  # what callers caught before the root existed
    assert name in (agent.protocol.__doc__ or ""), f"{name} is missing from the drawn tree"


def test_import_pulls_in_neither_cryptography_nor_numpy() -> None:
    code = ("import agent.protocol, sys; "
            "assert 'cryptography' not in sys.modules and 'numpy' not in sys.modules, "
            "sorted(m for m in sys.modules if m.split('.')[0] in ('cryptography', 'numpy'))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stderr
