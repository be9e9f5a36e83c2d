"""The type stub of the native core (``_native/_core.pyi``) describes every compiled module.

Each module this machine runs is compared with the stub: the same public names; for each
function and method the same parameters in the same order, with a default exactly where the
binding has one; for each class the same attributes. The configuration dataclasses that cross
into C++ have exactly the fields of the native structs they become.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import re
from pathlib import Path

import pytest

import fedrecon_fast as ff
from fedrecon_fast import _native

STUB = Path(_native.__file__).with_name("_core.pyi")
MODULES = [importlib.import_module(f"fedrecon_fast._native._core_{t}") for t in _native._runnable]
IDS = [m.__name__.rsplit("_", 1)[-1] for m in MODULES]


def _stub_parameters(fn: ast.FunctionDef) -> list[tuple[str, bool]]:
    """``[(name, has_default), ...]`` of a stub function, without ``self``."""
    args = fn.args.args
    defaults = [False] * (len(args) - len(fn.args.defaults)) + [True] * len(fn.args.defaults)
    return [(a.arg, d) for a, d in zip(args, defaults) if a.arg != "self"]


def _stub() -> tuple[dict, dict, set]:
    """The stub's functions, classes (name -> {member: node}) and constants."""
    tree = ast.parse(STUB.read_text())
    functions, classes, constants = {}, {}, set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            functions[node.name] = node
        elif isinstance(node, ast.ClassDef):
            classes[node.name] = {
                n.name if isinstance(n, ast.FunctionDef) else n.target.id: n
                for n in node.body
                if isinstance(n, (ast.FunctionDef, ast.AnnAssign))
            }
        elif isinstance(node, ast.AnnAssign):
            constants.add(node.target.id)
    return functions, classes, constants


def _split_top_level(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if text[start:].strip():
        parts.append(text[start:])
    return parts


def _bound_parameters(fn) -> list[tuple[str, bool]]:
    """``[(name, has_default), ...]`` from the signature pybind11 writes first in a docstring."""
    head = fn.__doc__.strip().splitlines()[0]
    inner = re.match(r"^\w+\((.*)\)\s*->", head).group(1)
    out = []
    for part in _split_top_level(inner):
        name = part.split(":")[0].strip()
        if name != "self":
            out.append((name, "=" in part))
    return out


def _public(names) -> set:
    return {n for n in names if not n.startswith("_") or n == "__version__"}


@pytest.mark.parametrize("module", MODULES, ids=IDS)
def test_the_stub_names_what_the_module_holds(module):
    functions, classes, constants = _stub()
    held = _public(dir(module)) - {"__version__"}
    assert held == set(functions) | set(classes) | (constants - {"__version__"})


@pytest.mark.parametrize("module", MODULES, ids=IDS)
def test_every_function_has_the_stub_parameters(module):
    functions, _, _ = _stub()
    for name, node in functions.items():
        assert _bound_parameters(getattr(module, name)) == _stub_parameters(node), name


@pytest.mark.parametrize("module", MODULES, ids=IDS)
def test_every_class_has_the_stub_members(module):
    _, classes, _ = _stub()
    for cls_name, members in classes.items():
        cls = getattr(module, cls_name)
        assert _public(dir(cls)) == _public(members) - {"__init__"}, cls_name
        for name, node in members.items():
            if (
                isinstance(node, ast.FunctionDef)
                and not any(isinstance(d, ast.Attribute) and d.attr == "setter" for d in node.decorator_list)
                and not any(isinstance(d, ast.Name) and d.id == "property" for d in node.decorator_list)
            ):
                assert _bound_parameters(getattr(cls, name)) == _stub_parameters(node), f"{cls_name}.{name}"


def test_configuration_dataclasses_have_the_native_structs_fields():
    """UpdateCodec is fedrecon::UpdateCodec field for field; ClientConfig is fedrecon::ClientConfig
    less the learned default, which each call adds."""
    core = _native.core

    def fields(struct):
        return {n for n in dir(struct) if not n.startswith("_")}

    assert {f.name for f in dataclasses.fields(ff.UpdateCodec)} == fields(core.UpdateCodec())
    assert {f.name for f in dataclasses.fields(ff.ClientConfig)} | {"user_default", "user_bias_default"} == fields(
        core.ClientConfig()
    )
