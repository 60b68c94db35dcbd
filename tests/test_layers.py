"""The layering of docs/design.md holds: import-linter's contracts (pyproject.toml) and no import
circle inside a package (function-level imports included: grimp reads every import statement)."""
import pytest

pytestmark = pytest.mark.timeout(300)

# the packages whose modules may not import each other in a circle (safechat itself: its cli over the three)
PACKAGES = ("runtime", "safechat.convert", "safechat.train", "safechat.bench", "safechat")


def test_import_linter_contracts_hold():
    importlinter = pytest.importorskip("importlinter")
    from importlinter.cli import lint_imports
    # lint_imports configures logging (disabling the loggers that exist): keep the logging state of the
    # process as it was, so tests that read the runtime's log records still see them afterwards
    import logging

    loggers = {name: (lg.disabled, lg.level, list(lg.handlers)) for name, lg in logging.Logger.manager.loggerDict.items()
               if isinstance(lg, logging.Logger)}
    root = (logging.root.level, list(logging.root.handlers))
    try:
        assert importlinter and lint_imports(config_filename="pyproject.toml") == 0  # 0: every contract kept
    finally:
        for name, (disabled, level, handlers) in loggers.items():
            lg = logging.getLogger(name)
            lg.disabled, lg.level, lg.handlers = disabled, level, handlers
        logging.root.level, logging.root.handlers = root


def _cycles(graph, package: str) -> list[list[str]]:
    """Import circles among the modules of one package (each found once, as a list of modules)."""
    mods = sorted(m for m in graph.modules if m == package or m.startswith(package + "."))
    def real(m, d):  # `import runtime._native`: the compiled extension, which grimp can only place on its package
        details = graph.get_import_details(importer=m, imported=d) if hasattr(graph, "get_import_details") else []
        return not details or not all("._native" in x["line_contents"] for x in details)
    edges = {m: sorted(d for d in graph.find_modules_directly_imported_by(m) if d in mods and real(m, d))
             for m in mods}
    found, state, stack = [], {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in edges[m]:
            if state.get(d) == 1:
                found.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2
    for m in mods:
        if m not in state:
            visit(m)
    return found


def test_no_import_circle_inside_a_package():
    grimp = pytest.importorskip("grimp")
    graph = grimp.build_graph("runtime", "safechat")
    circles = {p: _cycles(graph, p) for p in PACKAGES}
    assert not any(circles.values()), circles


def test_the_circle_finder_finds_one():
    class Graph:  # a -> b -> c -> a
        modules = {"p", "p.a", "p.b", "p.c"}

        def find_modules_directly_imported_by(self, m):
            return {"p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.a"}}.get(m, set())
    assert _cycles(Graph(), "p") == [["p.a", "p.b", "p.c", "p.a"]]


# Where an import of another package may sit inside a function (docs/design.md, section 5): the `safechat`
# CLI loads a verb's package when that verb runs; packages above `convert` load torch-backed modules (train,
# convert's references, bench's training benches) when used; any package loads the runtime's backends
# (llama.cpp, onnxruntime) when it opens a file; safechat/bench/memory.py measures the import itself.
LAZY_OK = {"runtime.backends.llama", "runtime.backends.onnx", "runtime.backends.native_loop", "runtime._native"}


def _function_level_imports(package: str):
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for path in sorted(root.joinpath(*package.split(".")).rglob("*.py")):
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    yield path.relative_to(root).as_posix(), node.lineno, node.module
                elif isinstance(node, ast.Import):
                    for a in node.names:
                        yield path.relative_to(root).as_posix(), node.lineno, a.name


def test_the_runtime_is_imported_at_module_level_by_the_packages_above_it():
    """runtime needs neither torch nor a backend library to import: hiding it in a function body buys nothing."""
    found = [f"{p}:{line} {mod}" for pkg in ("safechat",)  # the command line, convert, train and bench
             for p, line, mod in _function_level_imports(pkg)
             if mod.split(".")[0] == "runtime" and mod not in LAZY_OK and p != "safechat/bench/memory.py"]
    assert not found, found


def test_every_module_of_safechat_sits_in_a_layer():
    """The layers name safechat's modules one by one (safechat.cli, safechat.bench, ...): a new module or
    subpackage inside safechat must join a layer, or the contract would silently not cover it."""
    import pkgutil
    from pathlib import Path

    import safechat

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    conf = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["tool"]["importlinter"]
    (layers,) = [c["layers"] for c in conf["contracts"] if c["type"] == "layers"]
    named = {m.strip() for layer in layers for part in layer.split("|") for m in part.split(":")}
    children = {f"safechat.{m.name}" for m in pkgutil.iter_modules(safechat.__path__)}
    assert children and children <= named, sorted(children - named)
    assert {"safechat.cli", "safechat.bench", "safechat.train", "safechat.convert", "runtime"} <= named
    assert conf["root_packages"] == ["safechat", "runtime"]  # the two import names the wheel installs
