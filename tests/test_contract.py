"""The backend contract (fastbn/backends/_contract.py) holds for every backend, and the package's
import graph has no cycles and no private names taken from another package."""
import ast
import inspect
import pathlib

import pytest

from fastbn import backends
from fastbn.backends import _contract, _memory

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "fastbn"


def _backend_module(name):
    if name == "cuda":
        cuda = pytest.importorskip("numba.cuda")   # the cuda extra; CI installs it
        if not cuda.is_available():
            # the module imports (and its functions exist) without a GPU; only check_available
            # refuses, so read the module itself
            import importlib
            return importlib.import_module("fastbn.backends.cuda")
    return backends.load(name)


@pytest.mark.parametrize("name", backends.BACKENDS)
def test_every_operation_with_the_contract_parameters(name):
    module = _backend_module(name)
    for op_name, op in _contract.OPERATIONS.items():
        fn = getattr(module, op_name, None)
        assert callable(fn), f"{name}: missing operation {op_name}"
        params = tuple(inspect.signature(fn).parameters)
        assert params == op.params, f"{name}.{op_name}: parameters {params}, contract {op.params}"


@pytest.mark.parametrize("name", backends.BACKENDS)
def test_every_helper_and_attribute(name):
    module = _backend_module(name)
    for helper in _contract.HELPERS:
        assert callable(getattr(module, helper, None)), f"{name}: missing helper {helper}"
    for attribute in _contract.ATTRIBUTES:
        assert hasattr(module, attribute), f"{name}: missing attribute {attribute}"
    assert module.name == name
    if module.ON_DEVICE:
        # resolve asks a device backend through this predicate without importing the module
        assert module.owns is backends.DEVICE_OWNS[name]


def test_roles_name_only_parameters():
    for op_name, op in _contract.OPERATIONS.items():
        for role in (op.inputs, op.inouts, op.outputs):
            assert set(role) <= set(op.params), op_name
        assert not (set(op.inputs) & set(op.outputs)), op_name


def test_round_trip_wraps_every_operation():
    class FakeDevice:
        name = "fake"
        ON_DEVICE = True

    for op_name, op in _contract.OPERATIONS.items():
        def fn(*args, _op=op):
            return None
        fn.__signature__ = inspect.Signature(
            [inspect.Parameter(p, inspect.Parameter.POSITIONAL_OR_KEYWORD) for p in op.params])
        setattr(FakeDevice, op_name, staticmethod(fn))
    trip = backends.HostRoundTrip(FakeDevice())
    for op_name, op in _contract.OPERATIONS.items():
        assert tuple(inspect.signature(getattr(trip, op_name)).parameters) == op.params


def test_host_arrays_are_not_device_arrays():
    import numpy as np
    assert not _memory.is_device_array(np.zeros(3))
    assert not _memory.is_device_array([1.0, 2.0])
    assert not _memory.is_device_array(None)


# ----------------------------------------------------------------------------------------------
# the import graph of fastbn

def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path


def _imports(module, path):
    """(imported module, names) for every import in the file, top level or inside functions."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, ()
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            names = tuple(a.name for a in node.names)
            yield target, names


def _graph():
    modules = dict(_modules())
    graph = {m: set() for m in modules}
    private = []
    for module, path in modules.items():
        for target, names in _imports(module, path):
            if not target.startswith("fastbn"):
                continue
            for name in names or ("",):
                full = f"{target}.{name}" if name else target
                dep = full if full in modules else target
                if dep in modules and dep != module:
                    graph[module].add(dep)
                if name.startswith("_") and not name.startswith("__") and f"{target}.{name}" \
                        not in modules:
                    importer_package = module if path.name == "__init__.py" \
                        else module.rsplit(".", 1)[0]
                    target_package = target if target in modules and \
                        (PACKAGE.parent / target.replace(".", "/") / "__init__.py").exists() \
                        else target.rsplit(".", 1)[0]
                    if importer_package != target_package:
                        private.append(f"{module} imports {target}.{name}")
    return graph, private


def test_no_import_cycles():
    graph, _ = _graph()
    # a package's __init__ importing its own submodules is not a cycle: the edge that would
    # close one is a submodule importing the package's __init__ back
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph[node]):
            if dep.startswith(node + "."):
                continue    # a package importing its own submodule
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_private_names_from_another_package():
    _, private = _graph()
    assert not private, "private names imported across packages: " + "; ".join(private)
