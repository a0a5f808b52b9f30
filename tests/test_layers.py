"""The package's layers: each sub-package imports only from the layers below it, and no module
imports another in a cycle, lazy (function-level) imports included. The old flat import paths
(``pyro_esc.objectives``, ``pyro_esc.training``, ...) still import, as the very same modules.

The graph is read from the source with ``ast`` (every ``import`` statement, wherever it is), not
from ``sys.modules``, so an import inside a function counts as much as one at the top.
"""

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import pyro_esc

PACKAGE = Path(pyro_esc.__file__).parent

#: Bottom to top. A module may import from its own layer and the ones before it.
LAYERS = (
    ("utilities", ("pyro_esc._checks", "pyro_esc._files", "pyro_esc._pyro_internals", "pyro_esc.data")),
    ("closed forms", ("pyro_esc.distributions",)),
    ("priors", ("pyro_esc.priors",)),
    ("models and guides", ("pyro_esc.models", "pyro_esc.variational")),
    ("inference", ("pyro_esc.infer",)),
    ("training", ("pyro_esc.train",)),
    ("evaluation", ("pyro_esc.evaluate",)),
    ("applications", ("pyro_esc.apps", "pyro_esc.saving")),
    ("experiments and the command line", ("pyro_esc.experiments", "pyro_esc.plots", "pyro_esc.cli")),
    ("the public API", ("pyro_esc",)),
)

#: The flat paths of the modules that moved into layers, and where they went.
MOVED = {
    "gaussian": "distributions.gaussian", "kl": "distributions.kl", "posterior": "variational.posterior",
    "rows": "variational.rows", "guides": "variational.guides", "refinement": "variational.semi_amortized",
    "model": "models.sparse_coding", "annealing": "infer.annealing", "statistics": "infer.statistics",
    "objectives": "infer.objectives", "solver": "infer.solver", "steppers": "train.steppers",
    "rowwise": "train.rowwise", "em": "train.em", "convergence": "train.convergence", "history": "train.history",
    "checkpoint": "train.checkpoint", "restarts": "train.restarts", "standard_units": "train.standard_units",
    "training": "train.loop", "_isolation": "train._isolation", "evaluation": "evaluate.elbo",
    "likelihood": "evaluate.likelihood", "reference": "evaluate.reference", "metrics": "evaluate.metrics",
    "encoding": "apps.encoding", "denoising": "apps.denoising", "sklearn": "apps.sklearn",
    "lightning": "apps.lightning", "warm_start": "apps.warm_start",
}
ALIASES = {f"pyro_esc.{old}" for old in MOVED}


def layer_of(module):
    best = None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (index, len(prefix))
    assert best is not None, f"{module} belongs to no layer: put it in one of the layer packages"
    return best[0]


def modules():
    """Every module of the package but the aliases of the old paths: name -> source path."""
    found = {"pyro_esc": PACKAGE / "__init__.py"}
    for info in pkgutil.walk_packages([str(PACKAGE)], "pyro_esc."):
        if info.name in ALIASES:
            continue
        relative = info.name.split(".")[1:]
        path = PACKAGE.joinpath(*relative)
        found[info.name] = path / "__init__.py" if info.ispkg else path.with_suffix(".py")
    return found


def imports_of(name, path, known):
    """The package modules that ``name`` imports anywhere in its source."""
    is_package = path.name == "__init__.py"
    base = name.split(".") if is_package else name.split(".")[:-1]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parent = base[: len(base) - (node.level - 1)]
                module = ".".join(parent + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if not module.startswith("pyro_esc"):
                continue
            for alias in node.names:  # "from pkg import submodule" imports the submodule
                candidate = f"{module}.{alias.name}"
                targets.add(candidate if candidate in known or candidate in ALIASES else module)
        elif isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names if alias.name.startswith("pyro_esc"))
    return targets - {name}


@pytest.fixture(scope="module")
def graph():
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def test_no_module_imports_an_old_path(graph):
    # Inside the package every import names the module's home; the flat paths are for users.
    offenders = {name: sorted(targets & ALIASES) for name, targets in graph.items() if targets & ALIASES}
    assert not offenders, offenders


def test_each_layer_imports_only_from_itself_and_below(graph):
    upward = [f"{name} ({LAYERS[layer_of(name)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
              for name, targets in graph.items() for target in sorted(targets)
              if layer_of(target) > layer_of(name)]
    assert not upward, "\n".join(upward)


def test_the_import_graph_has_no_cycle(graph):
    # A package's __init__ importing its own modules is no cycle of meaning; edges into a package
    # stand for its modules, so package -> own submodule edges are left out.
    edges = {name: {target for target in targets if not target.startswith(name + ".")}
             for name, targets in graph.items()}
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == "open":
                cycle = stack[stack.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_import_paths_are_the_same_modules(old):
    if old == "lightning":
        pytest.importorskip("lightning")
    assert importlib.import_module(f"pyro_esc.{old}") is importlib.import_module(f"pyro_esc.{MOVED[old]}")


def test_public_names_keep_working_from_their_old_paths():
    from pyro_esc.guides import AmortizedNormal, LocalMultivariateNormal  # noqa: F401
    from pyro_esc.model import SparseCoding
    from pyro_esc.objectives import AnalyticELBO, EntropyELBO  # noqa: F401
    from pyro_esc.training import ConvergenceWarning, decaying_adam, fit  # noqa: F401

    assert SparseCoding is pyro_esc.SparseCoding and fit is pyro_esc.fit
