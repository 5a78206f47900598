"""
The project's layout: every import between its own modules runs one way (no cycle, lazy imports inside functions
included), and the kernel file a student reads first stands alone.
"""

import ast
import os

from conftest import REPO


def project_modules():
    """{module name: path} of the project's Python files: the top level and data/ (tests excluded)."""
    modules = {}
    for folder, prefix in ((REPO, ""), (os.path.join(REPO, "data"), "data.")):
        for name in sorted(os.listdir(folder)):
            if name.endswith(".py") and not name.startswith("test_"):
                modules[prefix + name[:-3]] = os.path.join(folder, name)
    return modules


def imports_of(path, modules):
    """The project's modules that the file at path imports, anywhere in it (inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]  # from data import shapes
        else:
            continue
        found |= {name for name in names if name in modules}
    return found


def find_cycle(graph):
    """A list of modules [a, b, ..., a] that import each other in a circle, or None."""
    state = {}  # module -> "open" while its imports are walked, "done" after

    def walk(module, path):
        state[module] = "open"
        for other in sorted(graph[module]):
            if state.get(other) == "open":
                return path[path.index(other):] + [other]
            if other not in state:
                cycle = walk(other, path + [other])
                if cycle:
                    return cycle
        state[module] = "done"
        return None
    for module in sorted(graph):
        if module not in state:
            cycle = walk(module, [module])
            if cycle:
                return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_every_import_runs_one_way():
    modules = project_modules()
    graph = {name: imports_of(path, modules) - {name} for name, path in modules.items()}
    assert {"model", "cog_kernel", "train_lm", "checkpoint", "data.prepare_lm"} <= set(graph)
    assert "cog_kernel" in graph["model"] or any("cog_kernel" in graph[m] for m in graph["model"])
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_kernel_file_imports_nothing_of_the_project():
    modules = project_modules()
    assert imports_of(modules["cog_kernel"], modules) == set()
    assert imports_of(modules["cog_kernel_tuned"], modules) == {"cog_kernel"}
    assert "authors" not in imports_of(modules["model"], modules)
