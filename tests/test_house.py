"""The house rules of the layout: scripts are thin and import only the library, never another script."""
import ast
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


def test_no_comment_cites_a_document_outside_the_repo():
    cited = [f"{p.relative_to(REPO)}:{i + 1}" for folder in ("", "utils", "data", "data/mini_abc_build", "benchmarks",
                                                              "tests")
             for p in sorted((REPO / folder).glob("*.py")) for i, line in enumerate(p.read_text().splitlines())
             if any(word in line for word in CITES_OUTSIDE)]
    assert not cited, cited


def test_no_file_edits_sys_path():
    """The repo is installed (pyproject.toml, `-e .` in requirements.txt): imports need no path hacks."""
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
