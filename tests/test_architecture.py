"""The package's layers import only downwards, and importing it needs torch alone.

Oracle: the import statements themselves (read with ast), against the rule that
docs/ARCHITECTURE.md states: ops imports nothing of the package but ``validation``; data
imports nothing of ops, mcore or training; mcore imports nothing of data or training.
"""

from __future__ import annotations

import ast

import pytest

from tests.support.fresh_interpreter import assert_runs_clean
from tests.support.training import REPO

PACKAGE = REPO / "adadpo_megatron"
FORBIDDEN = {
    "ops": ("mcore", "data", "training", "integrations"),
    "data": ("ops", "mcore", "training", "integrations"),
    "mcore": ("data", "training", "integrations"),
    # Megatron-LM's plug-in sits on top: adadpo-train never depends on it
    "training": ("integrations",),
}


def _imported_modules(path):
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_lower_layers_never_import_upper_ones(layer):
    files = sorted((PACKAGE / layer).rglob("*.py"))
    assert files, f"no modules under adadpo_megatron/{layer}"
    wrong = [f"{path.relative_to(REPO)} imports {module}"
             for path in files for module in _imported_modules(path)
             for upper in FORBIDDEN[layer]
             if module == f"adadpo_megatron.{upper}"
             or module.startswith(f"adadpo_megatron.{upper}.")]
    assert not wrong, "\n".join(wrong)


def test_ops_never_import_megatron():
    """The maths takes its process groups from the caller (docs/ARCHITECTURE.md); the
    megatron-core defaults are mcore/parallel_groups.py's. Any import, at any depth."""
    wrong = [f"{path.relative_to(REPO)} imports {module}"
             for path in sorted((PACKAGE / "ops").rglob("*.py"))
             for module in _imported_modules(path)
             if module == "megatron" or module.startswith("megatron.")]
    assert not wrong, "\n".join(wrong)


def _imported_candidates(path):
    """What an import statement may name a module by: ``import a.b`` gives a.b;
    ``from a.b import c`` gives a.b and a.b.c (c may be a module: ``from pkg import mod``)."""
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def _module_name(path):
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_import_cycles_even_through_imports_inside_functions():
    """An import inside a function hides a cycle from Python, not from the design: module A
    needing B needing A makes every change to either wide. Edges are every import statement
    of the package, at any depth, between modules of the package (a package's __init__
    re-exporting its modules is not a dependency of those modules)."""
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        imported = set()
        for target in _imported_candidates(path):
            if target in modules and target != name and not name.startswith(target + "."):
                imported.add(target)
        graph[name] = imported
    cycles = []
    state = {}  # name -> "open" while on the DFS path, "done" after

    def visit(name, path):
        state[name] = "open"
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "\n".join(cycles)


def test_importing_the_package_loads_neither_megatron_nor_datasets():
    assert_runs_clean("import sys, adadpo_megatron\n"
                      "loaded = {m.split('.')[0] for m in sys.modules}\n"
                      "assert not loaded & {'megatron', 'datasets', 'transformers'}, loaded\n"
                      "from adadpo_megatron import LossConfig, preference_loss  # on use\n"
                      "assert 'megatron' not in {m.split('.')[0] for m in sys.modules}\n"
                      "print('ok')\n")


def test_what_the_public_functions_take_is_exported_beside_them():
    """preference_loss takes LengthTails and a RewardRunningMean, coefficient_log_ratio takes
    PairStats: a user needs no module path to call them."""
    import inspect

    import adadpo_megatron

    for name in ("LengthTails", "PairStats", "RewardRunningMean"):
        assert name in adadpo_megatron.__all__ and hasattr(adadpo_megatron, name), name
    assert "running_mean" in inspect.signature(adadpo_megatron.preference_loss).parameters
    import torch

    # m_w = -1, m_l = -2 per token: log r = m_w - m_l = 1 (docs/LOSSES.md)
    stats = adadpo_megatron.PairStats(torch.tensor([-4.0]), torch.tensor([-4.0]),
                                      torch.tensor([4.0]), torch.tensor([2.0]))
    log_r = adadpo_megatron.coefficient_log_ratio(stats, adadpo_megatron.LossConfig())
    assert log_r.tolist() == [1.0]


def test_examples_use_the_public_api_only():
    """The examples are what users copy: they import from ``adadpo_megatron``, the
    application from ``adadpo_megatron.training`` and Megatron-LM's plug-in from
    ``adadpo_megatron.integrations.megatron_lm``, never a module path that may move.
    examples/gpu_check.py, which checks internals on a GPU, is the one exception."""
    examples = sorted(p for p in (REPO / "examples").rglob("*.py") if p.name != "gpu_check.py")
    assert len(examples) > 3
    wrong = [f"{path.relative_to(REPO)} imports {module}"
             for path in examples for module in _imported_modules(path)
             if module.startswith("adadpo_megatron")
             and module not in ("adadpo_megatron", "adadpo_megatron.training",
                                "adadpo_megatron.integrations.megatron_lm")]
    assert not wrong, "\n".join(wrong)


def test_the_application_is_exported_lazily():
    """Importing adadpo_megatron.training imports none of the modules it exports from (in a
    fresh interpreter); each export then imports its own module on first use and is the
    module's object."""
    code = (
        "import importlib, sys\n"
        "import adadpo_megatron.training as training\n"
        "modules = {f'adadpo_megatron.training.{m}' for m in training._EXPORTS.values()}\n"
        "assert not modules & set(sys.modules), sorted(modules & set(sys.modules))\n"
        "for name, module in training._EXPORTS.items():\n"
        "    value = getattr(training, name)\n"
        "    full = f'adadpo_megatron.training.{module}'\n"
        "    assert value is getattr(importlib.import_module(full), name), name\n"
        "print('ok')\n")
    assert_runs_clean(code)
    import adadpo_megatron.training as training

    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        training.Nope  # noqa: B018


def test_nothing_in_ops_or_mcore_branches_on_a_loss_name():
    """Issue 24: a loss's traits are one record (ops/loss_types.py). Code elsewhere reads the
    record, so adding a loss is one entry; a comparison with a loss type's name (``t ==
    "orpo"``, ``"bco_pair" in types``) would be a trait kept outside it."""
    from adadpo_megatron.ops.loss_types import LOSS_TYPES

    names = set(LOSS_TYPES)

    def literals(node):
        if isinstance(node, ast.Constant) and node.value in names:
            yield node.value
        elif isinstance(node, (ast.Set, ast.Tuple, ast.List)):
            for element in node.elts:
                yield from literals(element)

    found = []
    for layer in ("ops", "mcore"):
        for path in sorted((PACKAGE / layer).rglob("*.py")):
            if path.name in ("loss_types.py", "loss_terms.py"):
                continue
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.Compare):
                    for name in (x for side in (node.left, *node.comparators)
                                 for x in literals(side)):
                        found.append(f"{path.relative_to(REPO)}:{node.lineno} compares {name!r}")
    assert not found, "\n".join(found)


def test_nothing_private_crosses_a_module():
    """Issue 24: a name a module keeps to itself (a leading underscore) is never imported by
    another module of the package."""
    crossing = [f"{path.relative_to(REPO)}:{node.lineno} imports {alias.name} from "
                f"{node.module}"
                for path in sorted(PACKAGE.rglob("*.py"))
                for node in ast.walk(ast.parse(path.read_text(), filename=str(path)))
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                    "adadpo_megatron")
                for alias in node.names if alias.name.startswith("_")]
    assert not crossing, "\n".join(crossing)


def test_the_package_imports_its_own_modules_at_the_top():
    """Issue 24: imports of the package's own modules sit at the top of each module (where a
    reader looks for a module's dependencies); inside a function only what import cost or
    an optional dependency requires, and never the package's own modules, except the
    commands' (cli.py answers --help before megatron-core and the trainer are imported)."""
    inside = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inside += [f"{path.relative_to(REPO)}:{sub.lineno} in {node.name}()"
                           for sub in ast.walk(node) if isinstance(sub, ast.ImportFrom)
                           and (sub.module or "").startswith("adadpo_megatron")]
    assert not inside, "\n".join(inside)
