"""Task files (one JSON list of queries) and the ground-truth JSONs they point into (docs/method.md, section 2).

A test case is any `json/<test_case>.json` under the dataroot: AbC's four, or a user's own benchmark in
the same format. AbC's test cases belong to two families (objects, styles); any other test case is a
family of its own, named after it.
"""
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .errors import InputError
from .io import load_json

TEST_CASES = ("test_artchive", "test_bamfg", "test_observed_imagenet", "test_unobserved_imagenet")
FAMILIES = {
    "test_artchive": "style",
    "test_bamfg": "style",
    "test_observed_imagenet": "object",
    "test_unobserved_imagenet": "object",
}


@dataclass(frozen=True)
class Task:
    synth_image_path: str  # relative to the dataroot, e.g. synth/imagenet/gpt/<class>/samples/00000.png
    prompt: str  # the prompt that synthesized the query, contains <new1>
    test_case: str  # the name of json/<test_case>.json under the dataroot, e.g. test_artchive
    test_case_ind: int  # index into json/<test_case>.json
    model_path: str  # relative to the dataroot, e.g. models/imagenet/<class>
    train_prompt: str  # the customization caption, e.g. "<new1> fish"
    category: object = None  # "art" for styles, an ImageNet category name for objects; informational

    @property
    def model_key(self) -> str:
        """The model's name in the results layout (utils/layout.py): model_path without 'models/'."""
        return _strip_prefix(self.model_path, "models/")

    @property
    def query_key(self) -> str:
        """The query's name in the results layout (utils/layout.py): synth_image_path without 'synth/'."""
        return _strip_prefix(self.synth_image_path, "synth/")

    @property
    def family(self) -> str:
        """'object' or 'style' for AbC's test cases; another test case is its own family (test_mine -> mine)."""
        return FAMILIES.get(self.test_case, _strip_prefix(self.test_case, "test_"))


def _strip_prefix(path: str, prefix: str) -> str:
    path = path.strip("/")
    return path[len(prefix):] if path.startswith(prefix) else path


_TYPES = {"synth_image_path": str, "prompt": str, "test_case": str, "test_case_ind": int,
          "model_path": str, "train_prompt": str}


def load_tasks(path) -> List[Task]:
    """Read and validate a task file; every problem names the file, the entry and the fix."""
    entries = load_json(path, "task file")
    if not isinstance(entries, list) or not entries:
        raise InputError(f"task file {path}: expected a non-empty JSON list of query entries, "
                         f"got {type(entries).__name__}")
    known = {f.name for f in fields(Task)}
    tasks = []
    for i, entry in enumerate(entries):
        where = f"task file {path}, entry {i}"
        if not isinstance(entry, dict):
            raise InputError(f"{where}: expected an object, got {type(entry).__name__}")
        missing = [k for k in _TYPES if k not in entry]
        if missing:
            raise InputError(f"{where}: missing key(s) {', '.join(missing)}; "
                             f"each entry needs {', '.join(_TYPES)}")
        for key, typ in _TYPES.items():
            value = entry[key]
            if not isinstance(value, typ) or isinstance(value, bool):
                raise InputError(f"{where}: '{key}' must be a {typ.__name__}, got {value!r}")
        if not entry["test_case"] or "/" in entry["test_case"] or entry["test_case"].startswith("."):
            raise InputError(f"{where}: test_case {entry['test_case']!r} must name a file json/<test_case>.json "
                             f"under the dataroot, e.g. {TEST_CASES[0]!r}")
        if entry["test_case_ind"] < 0:
            raise InputError(f"{where}: test_case_ind must be >= 0, got {entry['test_case_ind']}")
        values = {k: v for k, v in entry.items() if k in known}
        for key in ("synth_image_path", "model_path"):  # one file, one spelling: before any check or grouping
            values[key] = normalized_path(values[key], f"{where}: '{key}'")
        tasks.append(Task(**values))
    _check_models_agree(tasks, path)
    seen = {}
    for i, t in enumerate(tasks):  # one output folder per query image: a second entry would overwrite the first
        if t.query_key in seen:
            j = seen[t.query_key]
            raise InputError(f"task file {path}: entries {j} ({entries[j]['synth_image_path']!r}) and {i} "
                             f"({entries[i]['synth_image_path']!r}) name the same query image {t.synth_image_path!r}; "
                             "remove one (results are kept per query image)")
        seen[t.query_key] = i
    return tasks


def normalized_path(path: str, where: str) -> str:
    """A task file's path relative to the dataroot in one spelling: forward slashes, no `.` or empty parts, no
    trailing slash ('./synth//a/x.png/' -> 'synth/a/x.png'), so that one file is one query and one folder one
    model. Raises InputError (naming `where`) for an absolute path, one that leaves the dataroot, or an empty one."""
    parts = [p for p in path.replace("\\", "/").split("/") if p not in ("", ".")]
    if path.startswith("/") or not parts or ".." in parts:
        raise InputError(f"{where} {path!r} must be a path inside the dataroot, relative to it (e.g. "
                         "'synth/...png' or 'models/...')")
    return "/".join(parts)


def _check_models_agree(tasks: List[Task], path) -> None:
    """Queries of one model share its exemplars and cache: they must name the same ground truth and caption."""
    first = {}
    for i, t in enumerate(tasks):
        j = first.setdefault(t.model_path, i)
        a = tasks[j]
        for key in ("test_case", "test_case_ind", "train_prompt"):
            if getattr(a, key) != getattr(t, key):
                raise InputError(f"task file {path}: entries {j} and {i} share model_path {t.model_path!r} but not "
                                 f"{key} ({getattr(a, key)!r} vs {getattr(t, key)!r}); the queries of one model "
                                 f"must point at the same json entry and train_prompt")


def tasks_by_model(tasks: List[Task]) -> Dict[str, List[Task]]:
    """The tasks grouped by model_path, models and tasks in task-file order."""
    groups: Dict[str, List[Task]] = {}
    for t in tasks:
        groups.setdefault(t.model_path, []).append(t)
    return groups


def unique_models(tasks: List[Task]) -> List[Task]:
    """The first task of each distinct model_path, in task-file order."""
    seen, out = set(), []
    for t in tasks:
        if t.model_path not in seen:
            seen.add(t.model_path)
            out.append(t)
    return out


def _model_entry(dataroot: Path, task: Task):
    """(json/<test_case>.json's path, the model's entry in it); InputError naming the file when either is missing."""
    json_path = dataroot / "json" / f"{task.test_case}.json"
    if not json_path.is_file():
        known = sorted(p.stem for p in (dataroot / "json").glob("*.json"))
        raise InputError(f"test-case file not found: {json_path} (test_case {task.test_case!r} of query "
                         f"{task.synth_image_path}); the dataroot has: {', '.join(known) or 'no json/*.json'}")
    entries = load_json(json_path, "test-case file")
    if not isinstance(entries, list) or task.test_case_ind >= len(entries):
        n = len(entries) if isinstance(entries, list) else 0
        raise InputError(f"{json_path} has {n} entries, but a task asks for test_case_ind "
                         f"{task.test_case_ind} (query {task.synth_image_path})")
    return json_path, entries[task.test_case_ind]


def exemplar_paths(dataroot, task: Task) -> List[Path]:
    """The model's exemplar images, from json/<test_case>.json[test_case_ind]['exemplar'].

    AbC writes them as 'dataset/...', where 'dataset' stands for the dataroot.
    """
    dataroot = Path(dataroot)
    json_path, entry = _model_entry(dataroot, task)
    raw = entry.get("exemplar") if isinstance(entry, dict) else None
    if not raw:
        raise InputError(f"{json_path} entry {task.test_case_ind} lists no 'exemplar' images")
    paths = [dataroot / _strip_prefix(p, "dataset/") for p in raw]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise InputError(f"{len(missing)} exemplar image(s) of {task.model_path} are missing, "
                         f"e.g. {missing[0]}; rerun data/download_abc.sh or check --dataroot")
    return paths


@dataclass(frozen=True)
class Reading:
    """One reading of a query's image-level ground truth: candidate images relative to the dataroot."""
    name: str
    matching: Tuple[str, ...]  # what the query's image shows (e.g. the exemplars of its look)
    non_matching: Tuple[str, ...]  # what its pair partner's image shows instead


def image_ground_truth(dataroot, task: Task) -> Optional[List[Reading]]:
    """The query's image-level ground truth, the first reading the primary one (docs/mini_abc.md, "Image-level test
    cases"), or None for a query whose answer is its model's (AbC's test cases).

    Format: the model's entry in json/<test_case>.json may hold "image_level": {synth_image_path: {"label", "pair",
    "prompt", "readings": [{"name", "matching": [paths], "non_matching": [paths]}]}}, paths relative to the
    dataroot ('exemplar/...' or 'laion_subset/images/...'); AbC's keys keep their meaning. Raises InputError naming
    the file for a malformed entry."""
    json_path, entry = _model_entry(Path(dataroot), task)
    truth = entry.get("image_level") if isinstance(entry, dict) else None
    if isinstance(truth, dict):  # keyed by query path, spelled as the task file's are once normalized
        truth = {normalized_path(k, f"{json_path} entry {task.test_case_ind}: an image_level key"): v
                 for k, v in truth.items()}
    if not truth or task.synth_image_path not in truth:
        return None
    try:
        readings = [Reading(r["name"], tuple(r["matching"]), tuple(r["non_matching"]))
                    for r in truth[task.synth_image_path]["readings"]]
    except (KeyError, TypeError) as e:
        raise InputError(f"{json_path} entry {task.test_case_ind}: image_level[{task.synth_image_path!r}] needs "
                         f"'readings', a list of {{name, matching, non_matching}} ({e!r})") from None
    if not readings or any(not r.matching or not r.non_matching for r in readings):
        raise InputError(f"{json_path} entry {task.test_case_ind}: a reading of {task.synth_image_path} has an "
                         f"empty matching or non-matching set")
    return readings
