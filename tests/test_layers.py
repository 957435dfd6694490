"""The package's architecture, checked: every import (lazy ones included) goes down the layers of
ARCHITECTURE.md or stays within one, the import graph has no circle, the serving code never loads torch, and the
format table and its builders describe the same formats."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "kdforge"

# lowest first; a module may import from its own layer or any layer below (ARCHITECTURE.md explains each)
LAYERS = [
    ("foundation", ["kdforge", "kdforge.errors", "kdforge.registry", "kdforge.optional", "kdforge.layout",
                    "kdforge.fileio", "kdforge.phases", "kdforge.images", "kdforge.formats", "kdforge.rng",
                    "kdforge.metrics", "kdforge.checkpoint", "kdforge.sessions", "kdforge.host",
                    "kdforge.timing", "kdforge.model_names", "kdforge.parity", "kdforge.device"]),
    ("recipe", ["kdforge.recipe", "kdforge.plan", "kdforge.reference"]),
    ("data and losses", ["kdforge.data", "kdforge.data.*", "kdforge.distill", "kdforge.distill.losses"]),
    ("lookups", ["kdforge.locate", "kdforge.card"]),
    ("models and runtime", ["kdforge.runtime", "kdforge.models", "kdforge.tracking"]),
    ("distillation", ["kdforge.distill.*"]),
    ("training", ["kdforge.train", "kdforge.train.*", "kdforge.estimate"]),
    ("runners", ["kdforge.runners", "kdforge.runners.*"]),
    ("verification", ["kdforge.judge"]),
    ("export", ["kdforge.export", "kdforge.export.*"]),
    ("analysis", ["kdforge.verify", "kdforge.bench", "kdforge.report", "kdforge.bundle",
                  "kdforge.remote"]),
    ("chain", ["kdforge.pipeline", "kdforge.seeds", "kdforge.students"]),
    ("interfaces", ["kdforge.cli", "kdforge.__main__", "kdforge.serve", "kdforge.serve.*"]),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def layer_of(module: str) -> int:
    """The first layer with a pattern naming `module` (exact names before wildcards)."""
    for exact in (True, False):
        for index, (_, patterns) in enumerate(LAYERS):
            if any(module == p if exact else fnmatch(module, p) for p in patterns):
                return index
    raise AssertionError(f"{module} is in no layer of tests/test_layers.py: add it (and to ARCHITECTURE.md)")


def imports_of(module: str, typing: bool = False) -> set[str]:
    """The kdforge modules `module` imports, anywhere in the file (under `if TYPE_CHECKING:` too when `typing`),
    with the packages Python runs on the way (importing kdforge.a.b runs kdforge/a/__init__.py), except the
    module's own packages (they are running already when it loads)."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    typing_only = set() if typing else {
        id(node) for block in ast.walk(tree) if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for stmt in block.body for node in ast.walk(stmt)}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    own_packages = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join([*base, *([node.module] if node.module else [])])
            submodules = [f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in MODULES]
            # `from package import submodule` loads the submodule; any other name is read from `target` itself
            names = submodules + ([target] if len(submodules) < len(node.names) else [])
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            prefixes = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
            found.update(p for p in prefixes if p in MODULES and (p == name or p not in own_packages))
    found.discard(module)
    return found


GRAPH = {module: imports_of(module) for module in MODULES}  # what runs
TYPED_GRAPH = {module: imports_of(module, typing=True) for module in MODULES}  # and what type checkers read


def test_every_import_goes_down_the_layers():
    """Type annotations included: a module's signatures name only types of its own layer or below."""
    upward = [f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
              for module, targets in TYPED_GRAPH.items() for target in targets
              if layer_of(target) > layer_of(module) and not module.startswith(f"{target}.")]
    assert upward == []


def test_the_import_graph_has_no_circle():
    """Counting imports under TYPE_CHECKING too."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(module: str) -> None:  # Tarjan's strongly connected components
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in TYPED_GRAPH[module]:
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for module in sorted(TYPED_GRAPH):
        if module not in index:
            visit(module)
    assert circles == []


def test_the_layer_checker_sees_lazy_upward_imports():
    """The checker itself: a function-level import counts, and a TYPE_CHECKING one counts in the typed graph."""
    assert "kdforge.recipe" in GRAPH["kdforge.models"]
    assert "kdforge.data" in GRAPH["kdforge.export.artifacts"]  # imported inside export_run
    assert "kdforge.recipe" not in GRAPH["kdforge.data"] and "kdforge.recipe" in TYPED_GRAPH["kdforge.data"]
    assert layer_of("kdforge.recipe") < layer_of("kdforge.distill.losses") < layer_of("kdforge.distill.teacher")
    assert [layer_of(m) for m in ("kdforge.runners", "kdforge.judge", "kdforge.export", "kdforge.verify")] == sorted(
        {layer_of(m) for m in ("kdforge.runners", "kdforge.judge", "kdforge.export", "kdforge.verify")})


def test_serving_imports_no_torch():
    """The serving image has no torch: the server, `kdforge predict`'s model and the format table load without it."""
    code = ("import sys, kdforge.serve.app, kdforge.serve.model, kdforge.serve.__main__, kdforge.serve.probe, "
            "kdforge.formats; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


def test_the_judges_arithmetic_imports_no_torch():
    """kdforge.parity judges logits where torch is not installed (the serving image, a device)."""
    code = "import sys, kdforge.parity; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


def test_lookups_and_the_report_import_no_torch():
    """`kdforge report` (and every command's lookup of its target) runs without loading torch."""
    code = ("import sys, kdforge.cli, kdforge.locate, kdforge.report; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


def test_every_format_has_a_builder_and_a_runner():
    from kdforge.export.builders import BUILDERS
    from kdforge.formats import FORMATS, RUNNERS, servable

    assert sorted(BUILDERS) == list(FORMATS)
    for name in FORMATS:
        fmt = FORMATS.get(name)
        assert fmt.runner in RUNNERS and (fmt.source is None or fmt.source in FORMATS)
    assert servable()[:3] == ["int8", "onnx", "fp16"] and "triton" not in servable()


def test_no_function_is_longer_than_80_lines():
    """A function a newcomer reads in one screen or two: the whole `def`, decorators and docstring included."""
    long = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                if node.end_lineno - start + 1 > 80:
                    long.append(f"{module}.{node.name}: {node.end_lineno - start + 1} lines")
    assert long == []


def test_the_torch_free_runtimes_are_opened_in_one_place():
    """Verification and `kdforge bench` (runners/), the server and the device probe (serve/) open ONNX Runtime,
    OpenVINO, LiteRT and NCNN through kdforge/sessions.py alone: what is verified is opened as it is served."""
    openers = ("InferenceSession(", "compile_model(", "Interpreter(", "ncnn.Net(")
    for module, path in MODULES.items():
        if module.startswith(("kdforge.runners", "kdforge.serve")):
            assert not [opener for opener in openers if opener in path.read_text()], module
    text = MODULES["kdforge.sessions"].read_text()
    assert all(opener in text for opener in openers)


def test_export_reaches_training_only_through_the_qad_stage():
    """Export speaks through the foundation's note channel (kdforge.phases); of the training code it runs only the
    QAD stage (INT8's escalation)."""
    reached = {(module, target) for module in MODULES if module.startswith("kdforge.export")
               for target in GRAPH[module] if target == "kdforge.train" or target.startswith("kdforge.train.")}
    assert reached <= {("kdforge.export.int8", "kdforge.train"), ("kdforge.export.int8", "kdforge.train.qad")}, reached


def test_long_jobs_speak_through_the_note_channel_only():
    """Every long-running entry point takes the foundation's consumers (`phases.notify`), none a `progress` or
    `warn` callable of its own: the chain, sharding, the teacher cache, the search, bench, the probe, the verdict."""
    import inspect

    from kdforge.bench import bench_export
    from kdforge.data.shards import write_shards
    from kdforge.distill.cache import load_or_build_cache
    from kdforge.pipeline import run_distill
    from kdforge.seeds import run_recipe, run_seeds
    from kdforge.serve.probe import probe
    from kdforge.serve.verdict import verify_bundle
    from kdforge.students import search_students
    from kdforge.train.stages import train_stage

    for function in (bench_export, write_shards, load_or_build_cache, run_distill, run_recipe, run_seeds, probe,
                     verify_bundle, search_students, train_stage):
        parameters = inspect.signature(function).parameters
        assert "consumers" in parameters, function.__qualname__
        assert not {"progress", "warn", "note", "say"} & set(parameters), function.__qualname__


def test_one_function_assembles_a_training_run():
    """The stages, QAD and the estimate train what `train.assemble.assemble_run` builds: no other module calls the
    loop's `fit`, builds a distillation objective or a stage's projectors itself."""
    callers = {module for module, path in MODULES.items()
               if module != "kdforge.train.assemble" and re.search(
                   r"(?<![.\w])fit\(|create_distill_objective\(|StageProjectors\(|FeatureHints\(", path.read_text())}
    assert callers <= {"kdforge.train.loop", "kdforge.distill.objective", "kdforge.distill.features"}, callers
