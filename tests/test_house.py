"""The house rules of the layout: scripts are thin and import only the library, never another script."""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FOLDERS = ("", "data", "benchmarks")
CITES_OUTSIDE = ("SP" + "EC", "../" + "shared")  # spelled in two parts so that this file does not cite them


def scripts():
    """{module name as imported: path} of every file with a `__main__` entry point."""
    out = {}
    for folder in FOLDERS:
        for path in sorted((REPO / folder).glob("*.py")):
            if '__name__ == "__main__"' in path.read_text():
                out[path.stem] = path
                if folder:
                    out[f"{folder}.{path.stem}"] = path
    return out


def imported_modules(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{a.name}" for a in node.names)


def test_no_script_imports_another():
    found = scripts()
    assert {"compute_training_loss", "compute_influence", "compute_fisher", "compute_baselines", "evaluate",
            "data.build_mini_abc", "data.encode_candidates", "mini_abc_comparison"} <= set(found)
    offences = [f"{path.relative_to(REPO)} imports {module}" for path in set(found.values())
                for module in imported_modules(path) if module in found and found[module] != path]
    assert not offences, offences


def test_the_library_imports_no_script():
    """utils/ is the library the scripts stand on: no module of it imports a top-level script (no arrow climbs back
    up the house), nor data/ or benchmarks/."""
    top = {p.stem for p in REPO.glob("*.py")}
    offences = [f"{p.relative_to(REPO)} imports {module}" for p in sorted((REPO / "utils").glob("*.py"))
                for module in imported_modules(p)
                if module.split(".")[0] in top | {"data", "benchmarks"}]
    assert not offences, offences


def test_the_builder_stages_import_no_build_script():
    """data/build_mini_abc.py imports its stages; a stage (data/mini_abc_build/) never imports the script back: the
    names both need live in data/mini_abc_build/common.py (no import circle, none hidden inside a function)."""
    offences = [f"{p.relative_to(REPO)} imports {module}" for p in sorted((REPO / "data" / "mini_abc_build").glob("*.py"))
                for module in imported_modules(p) if module.startswith("data.build_mini_abc")]
    assert not offences, offences


def test_no_comment_cites_a_document_outside_the_repo():
    cited = [f"{p.relative_to(REPO)}:{i + 1}" for folder in ("", "utils", "data", "data/mini_abc_build", "benchmarks",
                                                              "tests")
             for p in sorted((REPO / folder).glob("*.py")) for i, line in enumerate(p.read_text().splitlines())
             if any(word in line for word in CITES_OUTSIDE)]
    assert not cited, cited


def test_no_file_edits_sys_path():
    """Scripts run from the repo root (top-level ones by path, the others with `python -m`) and pytest puts the
    root on the path (pyproject.toml): imports need no path hacks."""
    hacks = [f"{p.relative_to(REPO)}:{i + 1}" for folder in ("", "utils", "data", "data/mini_abc_build", "benchmarks",
                                                             "tests")
             for p in sorted((REPO / folder).glob("*.py")) for i, line in enumerate(p.read_text().splitlines())
             if "sys.path." + "insert" in line or "sys.path." + "append" in line]
    assert not hacks, hacks


def test_the_pipeline_scripts_read_top_to_bottom():
    """The pipeline scripts and unlearn.py: at most 150 lines, and
    `main` the first function after the imports or the last before `__main__`."""
    for name in ("compute_training_loss.py", "compute_influence.py", "compute_baselines.py", "compute_fisher.py",
                 "evaluate.py", "unlearn.py"):
        path = REPO / name
        assert len(path.read_text().splitlines()) <= 150, name
        functions = [n.name for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef)]
        if "main" in functions:
            assert functions[0] == "main" or functions[-1] == "main", (name, functions)


def test_no_generic_name_resolves_to_the_repo_outside_it(tmp_path):
    """After the README's install, the repo's generic module names (utils, data, benchmarks, evaluate, ...) are not
    importable from another folder: they would shadow (or be shadowed by) libraries of the same name, such as
    Hugging Face's `evaluate`."""
    names = ["utils", "data", "benchmarks", "evaluate", "unlearn", "compute_influence", "compute_training_loss"]
    probe = ("import importlib.util, json, sys\n"  # a module's file, or a namespace package's first folder
             "specs = {n: importlib.util.find_spec(n) for n in sys.argv[1:]}\n"
             "print(json.dumps({n: s and (s.origin or list(s.submodule_search_locations or [None])[0])"
             " for n, s in specs.items()}))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", probe, *names], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout)
    inside = {n: o for n, o in found.items() if o and Path(o).resolve().is_relative_to(REPO)}
    assert not inside, f"importable from {tmp_path}: {inside}"
