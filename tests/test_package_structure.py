"""The package's shape: no import cycles, a pure-MLX model module, and a numpy backend that only the
backend selection reaches."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "whisper_mlx"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, top_level_only: bool) -> set[str]:
    """The whisper_mlx modules `path` imports (at module level only, or anywhere)."""
    tree = ast.parse(path.read_text())
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if base.startswith("whisper_mlx"):
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("whisper_mlx"))
    return found


def module_graph(top_level_only: bool = True) -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {
        name: {m for m in imports_of(path, top_level_only) if m in modules and m != name}
        for name, path in modules.items()
    }


def test_no_import_cycles_between_modules():
    graph = module_graph(top_level_only=False)  # a function-level import is a cycle too, only deferred
    graph = {
        name: {m for m in deps if not name.startswith(m + ".")} for name, deps in graph.items()
    }  # parents run first
    state: dict[str, int] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = 1
        for nxt in sorted(graph[name]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*trail, name, nxt]))
            if nxt not in state:
                visit(nxt, [*trail, name])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_model_module_is_pure_mlx():
    source = (PACKAGE / "whisper.py").read_text()
    assert imports_of(PACKAGE / "whisper.py", top_level_only=False) <= {
        "whisper_mlx.dims",
        "whisper_mlx.dims.ModelDimensions",
        "whisper_mlx.dims.sinusoids",
    }
    for device_check in ("default_device", "on_cpu", "mx.cpu", "mx.gpu", "numpy_backend"):
        assert device_check not in source


def test_only_the_backends_reach_the_numpy_backend_and_readers_skip_the_model():
    graph = module_graph(top_level_only=False)
    for name, deps in graph.items():
        if any(d.startswith("whisper_mlx.backends.numpy_backend") for d in deps):
            assert name.startswith("whisper_mlx.backends"), f"{name} imports the numpy backend"
        if name.startswith("whisper_mlx.formats"):
            assert "whisper_mlx.whisper" not in deps, f"{name} imports the MLX model for its dimensions"
