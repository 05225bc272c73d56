"""The shape of the code base, checked: no import cycles, no overlong functions, model code free of global
parallel state, and docs/architecture.md naming every module that exists."""
from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAX_FUNCTION_LINES = 80


def _python_files(*folders: str) -> list[str]:
    paths = []
    for folder in folders:
        for directory, _, files in os.walk(os.path.join(ROOT, folder)):
            paths += [os.path.join(directory, f) for f in files if f.endswith(".py")]
    return sorted(paths)


def _module_name(path: str) -> str:
    name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return name[:-len(".__init__")] if name.endswith(".__init__") else name


def _imports(path: str, known: set[str]) -> set[str]:
    """Modules of the package imported anywhere in the file (function-level imports too: a lazy import
    that dodges a cycle is still a cycle), except under `if TYPE_CHECKING:`."""
    tree = ast.parse(open(path).read())
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
               for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in known}
    return found


def _import_graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in _python_files("megatron_lite")}
    known = set(paths)
    return {module: _imports(path, known) - {module} for module, path in paths.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, result, counter = {}, {}, [], set(), [], [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                result.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return result


def test_no_import_cycles():
    graph = _import_graph()
    assert len(graph) > 40  # the scan sees the package
    assert _cycles(graph) == []


def test_cycle_detection_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_function_over_80_lines():
    long = []
    for path in _python_files("megatron_lite", "tools") + [os.path.join(ROOT, "pretrain_gpt.py")]:
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{os.path.relpath(path, ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "split these functions: " + "; ".join(long)


def test_model_and_layer_code_read_no_global_parallel_state():
    graph = _import_graph()
    for module, imported in graph.items():
        if module.startswith(("megatron_lite.models", "megatron_lite.tensor_parallel", "megatron_lite.kernels",
                              "megatron_lite.distributed", "megatron_lite.optimizer", "megatron_lite.pipeline")):
            assert "megatron_lite.parallel_state" not in imported, module


def test_collectives_is_the_only_caller_of_torch_distributed_ops():
    ops = {"all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast", "send", "recv",
           "isend", "irecv", "batch_isend_irecv", "all_to_all_single", "barrier", "all_gather_object",
           "broadcast_object_list"}
    offenders = []
    for path in _python_files("megatron_lite") + [os.path.join(ROOT, "pretrain_gpt.py")]:
        if path.endswith(os.path.join("megatron_lite", "collectives.py")):
            continue
        for node in ast.walk(ast.parse(open(path).read())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ops
                    and ast.unparse(node.func.value) in ("dist", "torch.distributed")):
                offenders.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}")
    assert not offenders


def test_architecture_doc_names_every_module():
    text = open(os.path.join(ROOT, "docs", "architecture.md")).read()
    missing = []
    for path in _python_files("megatron_lite"):
        rel = os.path.relpath(path, os.path.join(ROOT, "megatron_lite"))
        name = os.path.basename(rel)
        if name == "__init__.py":
            continue
        if name not in text:
            missing.append(rel)
    assert not missing, f"docs/architecture.md does not mention: {missing}"
