"""The code's shape: no script imports a script, the modules import each other in one direction only, one place
loads a trained run, and no function grows past a screen or two."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("train", "evaluate", "predict", "sweep", "compare", "bench")
# Lower modules first: each may import only modules before it (README, "Code map"). phantom.py and data.py are
# modules with a command line of their own (writing a phantom; looking at a data set), not scripts.
LAYERS = ("runfiles", "readers", "metrics", "dicom_outputs", "cohort", "phantom", "inputs", "data", "models", "midline", "scoring", "plots", "cv",
          "config", "trained")
OURS = set(SCRIPTS) | set(LAYERS)


def imports_of(name):
    tree = ast.parse(open(os.path.join(ROOT, f"{name}.py")).read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module.split(".")[0])
    return found & OURS


def functions_of(name):
    tree = ast.parse(open(os.path.join(ROOT, f"{name}.py")).read())
    return [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]


@pytest.mark.parametrize("script", SCRIPTS)
def test_no_script_imports_a_script(script):
    assert not imports_of(script) & (set(SCRIPTS) - {script}), f"{script}.py imports another script"


@pytest.mark.parametrize("module", LAYERS)
def test_modules_import_downwards(module):
    below = set(LAYERS[:LAYERS.index(module)])
    assert imports_of(module) <= below, f"{module}.py imports {sorted(imports_of(module) - below)}, not below it"


def test_metrics_are_torch_free():
    tree = ast.parse(open(os.path.join(ROOT, "metrics.py")).read())
    names = {alias.name for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
             for alias in node.names} | {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not {n for n in names if n and n.split(".")[0] == "torch"}


def test_one_place_loads_a_run():
    """models.load_checkpoint is called by trained.py (scoring a run), train.py (--resume) and bench.py only."""
    callers = set()
    for name in OURS:
        source = open(os.path.join(ROOT, f"{name}.py")).read()
        if "load_checkpoint(" in source and name != "models":
            callers.add(name)
    assert callers <= {"trained", "train", "bench"}, sorted(callers)


# The one scoring path takes, besides the model, the slices, the settings and the seed, four keywords with defaults
# that its callers set one by one (examples, maps, ground truth, workers) and the model's fitted normative map: kept
# explicit rather than bundled into an object no reader would look for.
MORE_PARAMETERS = {"scoring.score_split": 9}


@pytest.mark.parametrize("module", sorted(OURS))
def test_functions_stay_small(module):
    """No function over 60 lines, none over 8 parameters (dataclass constructors are not functions here; the
    exceptions in MORE_PARAMETERS, each with its reason)."""
    for node in functions_of(module):
        length = node.end_lineno - node.lineno + 1
        params = node.args.args + node.args.kwonlyargs + node.args.posonlyargs
        assert length <= 60, f"{module}.{node.name}: {length} lines"
        assert len(params) <= MORE_PARAMETERS.get(f"{module}.{node.name}", 8), f"{module}.{node.name}: {len(params)} parameters"
