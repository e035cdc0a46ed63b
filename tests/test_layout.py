"""The package's dependency direction: the model core imports no infrastructure, each layer imports
only the layers below it, and imports form no cycle. Checked on the source (every import statement,
function-level ones included), so it fails the moment a wrong import is added."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import andromeda

SOURCE = Path(andromeda.__file__).parent

# Layers, lowest first. A module may import its own layer and any layer below it.
LAYERS = [
    ("core", ["andromeda.config", "andromeda.model", "andromeda.choices"]),
    ("files", ["andromeda.folders", "andromeda.weights"]),
    ("inference", ["andromeda.inference"]),
    ("infrastructure", ["andromeda.tokenizers", "andromeda.data", "andromeda.checkpoint", "andromeda.parallel",
                        "andromeda.evaluation", "andromeda.plan", "andromeda.interop.x_transformers",
                        "andromeda.interop.hf"]),
    ("applications", ["andromeda.train", "andromeda.serve", "andromeda.interop.lm_eval", "andromeda.lm_eval"]),
    ("face", ["andromeda.andromeda", "andromeda.wrapper", "andromeda.interop", "andromeda"]),
    ("cli", ["andromeda.cli", "andromeda.__main__", "andromeda.pause"]),
]
# files (folder safety, the safetensors reader) know no model folder's kind; inference (sampling,
# generation, quantized and packed Linears) works on a model alone and reads quantized weights
# with the one safetensors reader; checkpoints load quantized models and parallelism refuses them,
# so infrastructure sits above both. `andromeda.choices` (option names and defaults, torch-free) is
# core so that any layer may take its constants from there. The test hooks (`andromeda.pause`) are
# the command line's: the library takes them as arguments and reads no test setting itself.


def module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    """The layer of the most specific prefix that names `module`."""
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    assert best is not None, f"{module} belongs to no layer; add it to LAYERS"
    return best


def imports(path: Path, *, executed_only: bool = False, text: str | None = None) -> set[str]:
    """The andromeda modules `path` imports (its source, or `text` in its place), relative
    imports resolved: every import statement, at module level or in a function. `executed_only`
    leaves out those under `if TYPE_CHECKING:`, which never run."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text() if text is None else text)
    skipped = _type_checking_only(tree) if executed_only else set()
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            for alias in node.names:  # `from . import checkpoint` imports a module, not a name
                name = f"{target}.{alias.name}"
                found.add(name if _is_module(name) else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name == "andromeda" or name.startswith("andromeda.")}


def _type_checking_only(tree: ast.AST) -> set[int]:
    """The ids of the nodes inside `if TYPE_CHECKING:` blocks."""
    inside = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            inside.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    return inside


def _is_module(name: str) -> bool:
    path = SOURCE.parent / name.replace(".", "/")
    return path.with_suffix(".py").is_file() or path.is_dir()


def check_module(path: Path, text: str | None = None) -> None:
    module = module_name(path)
    own = layer_of(module)
    for target in imports(path, text=text):
        theirs = layer_of(target)
        names = (LAYERS[own][0], LAYERS[theirs][0])
        assert theirs <= own, (
            f"{module} ({names[0]}) imports {target} ({names[1]}): dependencies must point down the layers")


SOURCES = sorted(SOURCE.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: module_name(p))
def test_each_module_imports_only_its_layer_and_below(path):
    check_module(path)


def test_the_model_core_imports_no_infrastructure():
    core = [p for p in SOURCES if layer_of(module_name(p)) == 0]
    assert {module_name(p) for p in core} >= {"andromeda.config", "andromeda.model.transformer",
                                              "andromeda.model.cache", "andromeda.model.attention"}
    for path in core:
        assert all(layer_of(target) == 0 for target in imports(path)), module_name(path)


def test_no_module_below_the_command_line_imports_the_test_hooks():
    """Pause points are injected (`train(..., pause=)`, `commit_checkpoint(..., pause=)`,
    `tokenize_corpus(..., tokenizer_pause=)`): the library never imports them, nor reads their
    environment variables."""
    from andromeda.pause import TEST_PAUSE_ENV, TOKENIZE_PAUSE_ENV

    cli = layer_of("andromeda.cli")
    for path in SOURCES:
        if layer_of(module_name(path)) < cli:
            assert "andromeda.pause" not in imports(path), f"{module_name(path)} imports andromeda.pause"
            text = path.read_text()
            assert TEST_PAUSE_ENV not in text and TOKENIZE_PAUSE_ENV not in text, (
                f"{module_name(path)} reads a test hook's environment variable")


def import_graph(texts: dict[str, str] | None = None) -> dict[str, set[str]]:
    """{module: the modules it imports when its code runs}, function-level imports included (a
    cycle through a function is a cycle all the same: the two modules cannot be understood,
    tested or layered apart). `texts` replaces some modules' sources."""
    texts = texts or {}
    return {module_name(p): imports(p, executed_only=True, text=texts.get(module_name(p))) for p in SOURCES}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` as [a, b, ..., a], or None."""
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return trail[trail.index(nxt):] + [node, nxt] if nxt in trail else [node, nxt]
            if nxt not in state and (cycle := visit(nxt, trail + [node])):
                return cycle
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node, [])):
            return cycle
    return None


def test_imports_have_no_cycle_function_level_ones_included():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_catches_a_cycle_through_a_function():
    """The cycle there was: checkpoint imported interop.hf inside its loading functions, and
    interop.hf imported checkpoint's helpers at module level. The loader calls the adapter now; an
    adapter function importing the loader back is reported, though it would run only when called."""
    hf = SOURCE / "interop" / "hf.py"
    text = hf.read_text() + "\n\ndef _late():\n    from ..checkpoint import load_transformer\n"
    cycle = find_cycle(import_graph({"andromeda.interop.hf": text}))
    assert cycle is not None and "andromeda.interop.hf" in cycle, cycle
    assert any(module.startswith("andromeda.checkpoint") for module in cycle), cycle


@pytest.mark.parametrize("module, line, message", [
    ("model/transformer.py", "from ..train import loop", r"andromeda.model.transformer \(core\) imports andromeda.train.loop"),
    ("model/cache.py", "import andromeda.checkpoint", r"andromeda.model.cache \(core\) imports andromeda.checkpoint"),
    ("inference/generate.py", "    from ..data import TokenStore", r"\(inference\) imports andromeda.data"),
    ("checkpoint/loader.py", "from ..andromeda import Andromeda", r"\(infrastructure\) imports andromeda.andromeda \(face\)"),
    ("weights.py", "    from .checkpoint import load_transformer", r"andromeda.weights \(files\) imports andromeda.checkpoint"),
])
def test_the_check_catches_a_wrong_import(module, line, message):
    """The rule is live: an import against the direction is reported, even inside a function."""
    path = SOURCE / module
    text = path.read_text() + ("\n\ndef _late():\n" + line + "\n" if line.startswith(" ") else "\n" + line + "\n")
    with pytest.raises(AssertionError, match=message):
        check_module(path, text)
