"""The package's layers: every import points down, nothing forms a cycle, the library stands
without the experiments, and the renamed modules and names keep working.

Each module of ``src/batchnorm`` belongs to a layer (:data:`LAYERS`) and may import only from
its own layer and the ones below it. The imports are read from the source with ``ast`` (the
ones inside functions too), so a deferred import cannot hide an upward arrow. A new module or
package needs an entry in :data:`LAYERS`; a package's entry covers its submodules.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Bottom to top. A module imports from its own layer and lower ones only.
LAYER_NAMES = ("foundation", "backends", "functional", "modules", "distributed", "tools",
               "models", "data", "experiments")
(FOUNDATION, BACKENDS, FUNCTIONAL, MODULES, DISTRIBUTED, TOOLS, MODELS, DATA,
 EXPERIMENTS) = range(len(LAYER_NAMES))

#: module or package -> layer. The root package ``batchnorm`` matches only itself.
LAYERS = {
    # foundation: activations table, statistics, rank/world size, oracle, C++ and Triton kernels
    "batchnorm.activations": FOUNDATION,
    "batchnorm.statistics": FOUNDATION,
    "batchnorm.process_group": FOUNDATION,
    "batchnorm.reference": FOUNDATION,
    "batchnorm.cpu": FOUNDATION,
    "batchnorm.kernels": FOUNDATION,
    # the backend seam and the "torch" backend
    "batchnorm.backends": BACKENDS,
    "batchnorm.autograd": BACKENDS,  # deprecated alias of batchnorm.backends.torch_backend
    "batchnorm.functional": FUNCTIONAL,
    "batchnorm.ghost": FUNCTIONAL,  # Ghost BN, the functional form under the modules
    "batchnorm.modules": MODULES,
    "batchnorm.swap": MODULES,
    "batchnorm.variants": MODULES,
    "batchnorm.variants.renorm_sync": DISTRIBUTED,  # Batch Renorm over processes
    "batchnorm.distributed": DISTRIBUTED,
    "batchnorm.inference": TOOLS,
    "batchnorm.known_layers": TOOLS,
    "batchnorm.conversion": TOOLS,
    "batchnorm.folding": TOOLS,
    "batchnorm.monitor": TOOLS,
    "batchnorm.probes": TOOLS,
    "batchnorm": TOOLS,  # the package's __init__ re-exports the public API up to this layer
    "batchnorm.models": MODELS,
    "batchnorm.data": DATA,
    "batchnorm.repro": EXPERIMENTS,
    "batchnorm.cli": EXPERIMENTS,
    "batchnorm.__main__": EXPERIMENTS,
}


def _module_files() -> dict[str, Path]:
    files = {}
    for path in sorted((SRC / "batchnorm").rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


FILES = _module_files()


def layer_of(name: str) -> int | None:
    """The layer of module ``name``: its own entry, else its closest package's (not the
    root's), else None."""
    parts = name.split(".")
    for end in range(len(parts), 1, -1):
        prefix = ".".join(parts[:end])
        if prefix in LAYERS:
            return LAYERS[prefix]
    return LAYERS.get(name)


def _describe(name: str) -> str:
    layer = layer_of(name)
    return f"{name} ({'no layer' if layer is None else LAYER_NAMES[layer]})"


def imports_of(name: str) -> set[str]:
    """The ``batchnorm`` modules that module ``name`` imports anywhere in its source."""
    path = FILES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, one level up per extra dot
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in FILES else base)
    return {m for m in found if (m == "batchnorm" or m.startswith("batchnorm.")) and m != name}


def test_every_module_has_a_layer():
    unknown = sorted(name for name in FILES if layer_of(name) is None)
    assert not unknown, (f"modules without a layer: {unknown}; add them (or their package) to "
                         "LAYERS in tests/test_layers.py")


def test_imports_point_down():
    upward = [
        f"{_describe(name)} imports {_describe(target)}"
        for name in FILES if layer_of(name) is not None
        for target in sorted(imports_of(name))
        if layer_of(target) is None or layer_of(target) > layer_of(name)
    ]
    assert not upward, ("imports against the layer order (or of modules without a layer; "
                        "see LAYERS in tests/test_layers.py):\n" + "\n".join(upward))


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of nodes (first == last), or None."""
    done: set[str] = set()
    stack: list[str] = []  # the current path of the depth-first search

    def visit(node: str) -> list[str] | None:
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if target in stack:
                return [*stack[stack.index(target):], target]
            if target not in done and (cycle := visit(target)):
                return cycle
        stack.pop()
        done.add(node)
        return None

    for start in sorted(graph):
        if start not in done and (cycle := visit(start)):
            return cycle
    return None


def test_the_checks_see_what_they_check():
    """The reader resolves packages, aliases and deferred imports; the cycle search works."""
    assert layer_of("batchnorm.kernels.launch") == FOUNDATION
    assert layer_of("batchnorm.repro.mnist") == EXPERIMENTS
    assert layer_of("batchnorm.nonexistent") is None
    # `from batchnorm import cpu as cpu_kernels`, `from batchnorm.x import name`
    assert {"batchnorm.cpu", "batchnorm.statistics"} <= imports_of(
        "batchnorm.backends.torch_backend")
    # importlib.import_module inside a function is no import statement: the seam's table
    assert imports_of("batchnorm.backends") == set()
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"b"}}) == ["b", "c", "b"]


def test_no_import_cycle():
    cycle = _find_cycle({name: imports_of(name) for name in FILES})
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


_IMPORT_BLOCKED = """
import importlib, importlib.abc, json, sys
module, blocked = sys.argv[1], tuple(json.loads(sys.argv[2]))

class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name in blocked or name.startswith(tuple(b + "." for b in blocked)):
            raise ImportError(f"{name} is blocked: the library must not import it")
        return None

sys.meta_path.insert(0, Blocked())
importlib.import_module(module)
"""


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter that imports this checkout's ``batchnorm``."""
    path = os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=600, cwd=SRC.parent, env={**os.environ, "PYTHONPATH": path})


def _import_error(module: str, blocked: list[str]) -> str | None:
    """None if ``module`` imports with ``blocked`` unimportable, else the error's last line."""
    result = _python(_IMPORT_BLOCKED, module, json.dumps(blocked))
    return None if result.returncode == 0 else result.stderr.strip().splitlines()[-1]


def test_library_imports_without_the_experiments():
    """Each module below the experiments imports alone, in a fresh interpreter, while
    importing any experiment module (``batchnorm.repro``, the command line) raises."""
    blocked = sorted(name for name, layer in LAYERS.items() if layer == EXPERIMENTS)
    library = [name for name in FILES if layer_of(name) is not None
               and layer_of(name) < EXPERIMENTS]
    if importlib.util.find_spec("triton") is None:
        library = [name for name in library if not name.startswith("batchnorm.kernels")]
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        errors = dict(zip(library, pool.map(lambda name: _import_error(name, blocked), library),
                          strict=True))
    failed = {name: error for name, error in errors.items() if error is not None}
    assert not failed, "\n".join(f"{name}: {error}" for name, error in failed.items())


def test_importing_the_package_loads_no_backend():
    """The backends are imported on the first call that needs one (batchnorm.backends)."""
    code = ("import sys, batchnorm, batchnorm.functional, batchnorm.modules\n"
            "loaded = [m for m in ('batchnorm.backends.torch_backend', 'batchnorm.kernels',\n"
            "                      'batchnorm.cpu', 'batchnorm.autograd') if m in sys.modules]\n"
            "assert not loaded, loaded\n")
    result = _python(code)
    assert result.returncode == 0, result.stderr


def test_deprecated_aliases(monkeypatch):
    from batchnorm import activations, modules, statistics
    from batchnorm.backends import torch_backend

    monkeypatch.delitem(sys.modules, "batchnorm.autograd", raising=False)
    with pytest.warns(DeprecationWarning, match="batchnorm.autograd is deprecated"):
        autograd = importlib.import_module("batchnorm.autograd")
    assert autograd.batch_statistics is statistics.mean_and_variance
    assert autograd.ACTIVATIONS is activations.ACTIVATIONS
    for name in ("BatchNormFunction", "batch_norm", "closed_form_backward",
                 "training_batch_norm"):
        assert getattr(autograd, name) is getattr(torch_backend, name)
    for name in ("cast", "centered_statistics", "compute_dtype", "per_channel", "reduce_dims"):
        assert getattr(autograd, name) is getattr(statistics, name)
    with pytest.warns(DeprecationWarning, match="use TORCH_TO_OURS"):
        assert modules.OURS is modules.TORCH_TO_OURS
    with pytest.raises(AttributeError, match="no attribute 'NOT_THERE'"):
        modules.NOT_THERE  # noqa: B018
