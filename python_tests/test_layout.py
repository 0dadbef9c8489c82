"""The folders show the two layers: the library (lasers_ext/) never imports the application (lasers_ext/training/),
the application's modules import each other in one order (no cycles), and the old module paths still work."""

import ast
import importlib
import importlib.metadata
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import lasers_ext
from lasers_ext import _moved

LIBRARY = Path(lasers_ext.__file__).parent
# the order of lasers_ext/training/__init__.py's docstring: each module may import only modules before it
TRAINING_ORDER = ["tasks", "data", "metrics", "plots", "distributed", "peers", "config", "runs", "evaluation", "loop",
                  "comparison", "sweep", "spatial_depth", "prior", "cli"]


def _imports(path: Path) -> set[str]:
    """Absolute names of the modules ``path`` imports (relative imports resolved against its package)."""
    package = ("lasers_ext.training" if path.parent.name == "training" else "lasers_ext").split(".")
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            names.add(module)
            names.update(f"{module}.{a.name}" for a in node.names)  # `from . import x` imports module x
    return names


@pytest.mark.parametrize("path", sorted(p.name for p in LIBRARY.glob("*.py")))
def test_library_never_imports_the_application(path):
    imported = _imports(LIBRARY / path)
    if path == "_moved.py":  # names the new paths as strings only
        imported = {n for n in imported if not n.startswith("lasers_ext")}
    app = {n for n in imported if n.startswith(("lasers_ext.training", "lasers_bench", "tqdm", "matplotlib",
                                                 "scipy", "PIL", "skimage"))}
    assert not app, f"lasers_ext/{path} imports the application or its extra: {sorted(app)}"


def test_training_modules_import_downward_only():
    modules = {p.stem for p in (LIBRARY / "training").glob("*.py")} - {"__init__"}
    assert modules == set(TRAINING_ORDER), "a new module of lasers_ext/training needs its place in TRAINING_ORDER"
    for i, name in enumerate(TRAINING_ORDER):
        imported = {n.split(".")[2] for n in _imports(LIBRARY / "training" / f"{name}.py")
                    if n.startswith("lasers_ext.training.") and n.split(".")[2] in modules}
        later = imported & set(TRAINING_ORDER[i:])
        assert not later, f"training/{name}.py imports {sorted(later)}, which come at or after it"


def test_public_names_of_the_application_are_not_shadowed_by_its_modules():
    import lasers_ext.training as app

    for name in TRAINING_ORDER:
        importlib.import_module(f"lasers_ext.training.{name}")  # importing a submodule sets an attribute of app
    for name in app.__all__:
        assert not isinstance(getattr(app, name), type(app)), f"lasers_ext.training.{name} is a module"


def test_old_module_paths_are_the_new_modules_with_a_warning():
    for old, new in _moved.MOVED.items():
        sys.modules.pop(old, None)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            module = importlib.import_module(old)
        assert module is importlib.import_module(new), old
        assert any(issubclass(w.category, FutureWarning) and new in str(w.message) for w in caught), old
    from lasers_ext.train import TrainConfig, train  # the names users imported from the old train module

    assert TrainConfig is lasers_ext.training.TrainConfig and train is lasers_ext.training.train


def test_old_cli_path_runs_as_a_module_and_the_commands_are_installed():
    proc = subprocess.run([sys.executable, "-m", "lasers_ext.cli", "train", "--help"], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    assert "--batch-size" in proc.stdout and "lasers_ext.training.cli" in proc.stderr
    scripts = {e.name: e.value for e in importlib.metadata.entry_points(group="console_scripts")
               if e.name in ("lasers", "lasers-omp-bench")}
    assert scripts == {"lasers": "lasers_ext.training.cli:main", "lasers-omp-bench": "lasers_bench.omp_bench:main"}
    for entry in importlib.metadata.entry_points(group="console_scripts"):
        if entry.name in scripts:
            assert callable(entry.load())
