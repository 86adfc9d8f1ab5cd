"""The fault catalogue (docs/reliability.md): damaged data, a hostile environment and hard kills, on the tiny benchmark.

Verdict of every refused case: *clear* (exit code != 0, exactly one `error: ...` line naming the file or flag
and the fix, no traceback) and *nothing lost* (every file under the results folder before the run is
byte-identical after it, and no temporary file is left). Kill cases: a run stopped with SIGKILL at a named
point (utils/faults.py), then rerun, ends with exactly the files of an uninterrupted run, and what was
finished before the kill is not computed again.
"""
import errno
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import compute_influence
import compute_training_loss
import utils.io
from utils.cli import run as run_cli_wrapper
from benchmarks.runner import python_command
from helpers import STAGE1, paths, stage2_flags

REPO = Path(__file__).resolve().parent.parent
STAGE2 = stage2_flags(accum=1, batch=2)
QUERY = "synth/imagenet/gpt/n01440764_0000/samples/00000.png"
EXEMPLAR = "exemplar/imagenet/n01440764_0000/000.png"
MODEL = "models/imagenet/n01440764_0000"


def cli(script, args, env=None, file_size_limit_kib=None, timeout=300):
    cmd = python_command(script) + [str(a) for a in args]
    if file_size_limit_kib:  # a real kernel limit on the size of any file the run writes (bash's ulimit -f)
        cmd = ["bash", "-c", f'ulimit -f {file_size_limit_kib}; exec "$@"', "bash"] + cmd
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=timeout,
                          env={**os.environ, "TQDM_DISABLE": "1", **(env or {})})


def snapshot(folder: Path) -> dict:
    """{relative path: bytes} of every file under folder, claims aside (they exist only while work runs)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".claim" and not p.name.endswith(".claim")}


def assert_clear_and_nothing_lost(code, stderr, results, before, message):
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code not in (0, None), stderr[-2000:]
    assert len(errors) == 1, stderr[-2000:]
    assert message in stderr and "Traceback" not in stderr, stderr[-2000:]
    after = snapshot(results)
    assert {k: v for k, v in after.items() if k in before} == before  # every earlier file, byte for byte
    assert not [k for k in after if ".tmp-" in k]


@pytest.fixture
def finished(tiny_copy, tmp_path):
    """A private tiny benchmark with both stages finished (these are the results that must not be lost)."""
    results = tmp_path / "results"
    compute_training_loss.main(paths(tiny_copy, results) + STAGE1)
    compute_influence.main(paths(tiny_copy, results) + STAGE2)
    return tiny_copy, results


# ------------------------------------------------------------------------------------------ damaged data
def nan_row(root, name, row, value=np.nan):
    a = np.load(root / name)
    a[row] = value
    np.save(root / name, a)


def damage_custom_weights(root):
    f = root / "models" / "imagenet" / "n01440764_0000" / "pytorch_custom_diffusion_weights.pt"
    state = torch.load(f)
    next(iter(state.values()))[0, 0] = float("nan")
    torch.save(state, f)


def damage_fisher(root):
    fisher = torch.load(root / "sd_fisher.pt")
    next(v for k, v in fisher.items() if "attn2.to_k" in k)[0, 0] = float("inf")
    torch.save(fisher, root / "sd_fisher.pt")


def fewer_text_rows(root):
    np.save(root / "laion_text_embeddings.npy", np.load(root / "laion_text_embeddings.npy")[:-1])


def wide_concept(root):
    torch.save({"<new1>": torch.randn(48)}, root / "models" / "imagenet" / "n01440764_0000" / "<new1>.bin")


def empty_file(rel):
    return lambda root: (root / rel).write_bytes(b"")


def truncated_png(rel):
    return lambda root: (root / rel).write_bytes((root / rel).read_bytes()[:60])


def truncated(rel, keep: float = 0.5):
    """The file cut to `keep` of its bytes, as an interrupted copy or download leaves it."""
    return lambda root: (root / rel).write_bytes((root / rel).read_bytes()[:int((root / rel).stat().st_size * keep)])


def as_truncated_safetensors(rel):
    """The customized weights saved as safetensors (diffusers' default), then cut in half."""
    def damage(root):
        from safetensors.torch import save_file

        src = root / rel
        save_file(torch.load(src), src.with_suffix(".safetensors"))
        src.unlink()
        truncated(src.with_suffix(".safetensors").relative_to(root))(root)
    return damage


def overflowing_keys(root):
    """K weights scaled until their largest entry is 1e38 (finite): the keys overflow fp32 and the losses are NaN,
    as a UNet at fp16 can make them."""
    f = root / MODEL / "pytorch_custom_diffusion_weights.pt"
    state = torch.load(f)
    torch.save({k: v * (1e38 / v.abs().max()) if "to_k" in k else v for k, v in state.items()}, f)


def duplicate_query(task_json):
    tasks = json.loads(Path(task_json).read_text())
    Path(task_json).write_text(json.dumps(tasks + [tasks[0]]))


DAMAGED = [  # (case, what to damage, the script that must refuse, what the error names)
    ("NaN in laion_latents.npy", lambda r: nan_row(r, "laion_latents.npy", 5), "compute_training_loss.py",
     "laion_latents.npy: row(s) [5] hold NaN or inf"),
    ("inf in laion_text_embeddings.npy", lambda r: nan_row(r, "laion_text_embeddings.npy", 2, np.inf),
     "compute_training_loss.py", "laion_text_embeddings.npy: row(s) [2] hold NaN or inf"),
    ("inf in the Fisher", damage_fisher, "compute_influence.py", "has non-finite entries"),
    ("NaN in the customized weights", damage_custom_weights, "compute_training_loss.py", "holds NaN or inf"),
    ("latents and embeddings with different row counts", fewer_text_rows, "compute_training_loss.py",
     "laion_text_embeddings.npy: expected [12, 77, D] to match 24 latent rows"),
    ("a zero-byte exemplar image", empty_file(EXEMPLAR), "compute_training_loss.py", "is an empty file (0 bytes)"),
    ("a truncated exemplar image", truncated_png(EXEMPLAR), "compute_training_loss.py", "cannot read image"),
    ("a zero-byte query image", empty_file(QUERY), "compute_influence.py", "is an empty file (0 bytes)"),
    ("a <new1>.bin of the wrong width", wide_concept, "compute_training_loss.py",
     "embedding has 48 values, the text encoder expects 32"),
    ("truncated customized weights (.pt)", truncated(f"{MODEL}/pytorch_custom_diffusion_weights.pt"),
     "compute_training_loss.py", f"{MODEL}/pytorch_custom_diffusion_weights.pt ("),
    ("truncated customized weights (.safetensors)", as_truncated_safetensors(
        f"{MODEL}/pytorch_custom_diffusion_weights.pt"), "compute_training_loss.py",
     "pytorch_custom_diffusion_weights.safetensors ("),
    ("a truncated <new1>.bin", truncated(f"{MODEL}/<new1>.bin"), "compute_training_loss.py",
     f"{MODEL}/<new1>.bin ("),
    ("a truncated sd_fisher.pt", truncated("sd_fisher.pt"), "compute_influence.py", "cannot read Fisher file"),
    ("a truncated laion_latents.npy", truncated("laion_latents.npy", 0.9), "compute_training_loss.py",
     "cannot read candidate array"),
    ("a UNet whose losses overflow", overflowing_keys, "compute_training_loss.py",
     "have a NaN or infinite loss (rows [0, 1, 2, 3, 4, 5]) at --precision fp32; the customized UNet overflows"),
]


@pytest.mark.parametrize("case, damage, script, message", DAMAGED, ids=[c[0] for c in DAMAGED])
def test_damaged_data_is_refused_clearly_and_loses_nothing(finished, case, damage, script, message):
    bench, results = finished
    before = snapshot(results)
    damage(Path(bench["dataroot"]))
    flags = STAGE1 if script == "compute_training_loss.py" else STAGE2
    proc = cli(script, paths(bench, results) + flags + ["--overwrite"])
    assert_clear_and_nothing_lost(proc.returncode, proc.stderr, results, before, message)


def test_without_stage_1_a_damaged_exemplar_is_refused_before_any_work(finished):
    """--before_losses on-demand encodes the exemplars in stage 2: a broken one must stop it before unlearning."""
    bench, results = finished
    before = snapshot(results)
    empty_file(EXEMPLAR)(Path(bench["dataroot"]))
    proc = cli("compute_influence.py", paths(bench, results) + STAGE2 + [
        "--overwrite", "--mode", "two-stage", "--before_losses", "on-demand"])
    assert_clear_and_nothing_lost(proc.returncode, proc.stderr, results, before, "is an empty file (0 bytes)")


def test_a_task_file_naming_a_query_twice_is_refused(finished):
    bench, results = finished
    before = snapshot(results)
    duplicate_query(bench["task_json"])
    for script, flags in (("compute_training_loss.py", STAGE1), ("compute_influence.py", STAGE2)):
        proc = cli(script, paths(bench, results) + flags)
        assert_clear_and_nothing_lost(proc.returncode, proc.stderr, results, before, "name the same query")


def respell(path: str, how: int) -> str:
    """The same relative path spelled another way: ./x, a//b, or with a trailing slash."""
    head, _, tail = path.partition("/")
    return ["./" + path, f"{head}//{tail}", path + "/"][how]


@pytest.mark.parametrize("how", [0, 1], ids=["./synth", "synth//"])
def test_one_query_spelled_two_ways_is_one_query_and_refused_twice(finished, how):
    bench, results = finished
    before = snapshot(results)
    entries = json.loads(Path(bench["task_json"]).read_text())
    entries.append({**entries[0], "synth_image_path": respell(entries[0]["synth_image_path"], how)})
    Path(bench["task_json"]).write_text(json.dumps(entries))
    for script, flags in (("compute_training_loss.py", STAGE1), ("compute_influence.py", STAGE2)):
        proc = cli(script, paths(bench, results) + flags)
        assert_clear_and_nothing_lost(proc.returncode, proc.stderr, results, before, "name the same query image")
        assert repr(entries[-1]["synth_image_path"]) in proc.stderr  # both spellings named


def test_a_model_path_spelled_two_ways_is_one_model(tiny_copy, tmp_path):
    """'models/x/' beside 'models/x': one model (one cache, one group of peers), its outputs where 'models/x' puts
    them; a path that leaves the dataroot is refused."""
    from utils.tasks import load_tasks, tasks_by_model

    original = json.loads(Path(tiny_copy["task_json"]).read_text())
    entries = json.loads(Path(tiny_copy["task_json"]).read_text())
    assert len(entries) >= 2 and len({e["model_path"] for e in entries}) < len(entries)
    for i, e in enumerate(entries):
        e["model_path"] = respell(e["model_path"], i % 3)
        e["synth_image_path"] = respell(e["synth_image_path"], (i + 1) % 3)
    Path(tiny_copy["task_json"]).write_text(json.dumps(entries))
    tasks = load_tasks(tiny_copy["task_json"])
    assert [t.model_path for t in tasks] == [e["model_path"] for e in original]
    assert [t.synth_image_path for t in tasks] == [e["synth_image_path"] for e in original]
    assert len(tasks_by_model(tasks)) == len({e["model_path"] for e in original})
    results = tmp_path / "results"
    proc = cli("compute_training_loss.py", paths(tiny_copy, results) + STAGE1)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.parent.relative_to(results / "orig_loss").as_posix()
                  for p in (results / "orig_loss").rglob("settings.json")) == \
        sorted({e["model_path"][len("models/"):] for e in original})
    entries[0]["synth_image_path"] = "../outside.png"
    Path(tiny_copy["task_json"]).write_text(json.dumps(entries))
    proc = cli("compute_training_loss.py", paths(tiny_copy, results) + STAGE1)
    assert proc.returncode == 2 and "must be a path inside the dataroot" in proc.stderr


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "I;16", "CMYK", "P"])
def test_other_image_modes_are_converted_as_documented(tmp_path, mode):
    """Accepted: every mode becomes 8-bit RGB; transparent pixels become white; 16-bit scales, not clips."""
    from utils.transforms import load_rgb

    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[:, :2] = (200, 40, 40)
    if mode in ("RGBA", "LA"):
        rgba = np.dstack([rgb, np.full((4, 4), 255, np.uint8)])
        rgba[:, 2:, 3] = 0  # right half transparent
        img = Image.fromarray(rgba, "RGBA").convert(mode)
    elif mode == "I;16":
        values = np.arange(16, dtype=np.uint16).reshape(4, 4) * 4369  # 0 .. 65535
        img = Image.frombytes("I;16", (4, 4), values.astype("<u2").tobytes())
    else:
        img = Image.fromarray(rgb).convert(mode)
    img.save(tmp_path / ("x.tif" if mode in ("I;16", "CMYK") else "x.png"))
    out = np.asarray(load_rgb(next(tmp_path.iterdir())))
    assert out.dtype == np.uint8 and out.shape == (4, 4, 3)
    if mode in ("RGBA", "LA"):
        assert (out[:, 2:] == 255).all() and out[:, :2].max() < 255  # transparent -> white, opaque kept
    elif mode == "I;16":
        assert out[0, 0].tolist() == [0, 0, 0] and out[3, 3].tolist() == [255, 255, 255] and 100 < out[1, 3, 0] < 160
    else:
        assert abs(int(out[0, 0, 0]) - {"L": 89, "CMYK": 200, "P": 200}[mode]) <= 12


# ------------------------------------------------------------------------------------------ the environment
def refuse_writes(monkeypatch, code, when):
    """Every open() for writing in utils.io fails with `code` when `when(path)` holds."""
    real_open = open

    def fake_open(file, mode="r", *args, **kw):
        if any(m in mode for m in "wax") and when(str(file)):
            raise OSError(code, os.strerror(code), str(file))
        return real_open(file, mode, *args, **kw)

    monkeypatch.setattr(utils.io, "open", fake_open, raising=False)


def run_in_process(main, args, capsys):
    with pytest.raises(SystemExit) as e:
        run_cli_wrapper(lambda: main(args))
    return e.value.code, capsys.readouterr().err


def test_a_read_only_results_folder_is_refused_before_any_work(finished, monkeypatch, capsys):
    bench, results = finished
    before = snapshot(results)
    refuse_writes(monkeypatch, errno.EROFS, lambda p: p.startswith(str(results)))
    code, err = run_in_process(compute_influence.main, paths(bench, results) + STAGE2 + ["--overwrite"], capsys)
    assert_clear_and_nothing_lost(code, err, results, before, f"cannot write {results}: the file system is read-only")


def test_a_full_disk_while_writing_an_output(finished, monkeypatch, capsys):
    bench, results = finished
    before = snapshot(results)
    refuse_writes(monkeypatch, errno.ENOSPC, lambda p: "laion_loss.npy.tmp-" in p)
    code, err = run_in_process(compute_influence.main, paths(bench, results) + STAGE2 + ["--overwrite"], capsys)
    assert_clear_and_nothing_lost(code, err, results, before, "laion_loss.npy: the disk is full")


def test_a_file_size_limit_stops_a_subprocess_cleanly(finished):
    """ulimit -f 4 KiB: the first larger output (the exemplar latents) fails to write (EFBIG)."""
    bench, results = finished
    before = snapshot(results)

    proc = cli("compute_training_loss.py", paths(bench, results) + STAGE1 + ["--overwrite"], file_size_limit_kib=4)
    assert_clear_and_nothing_lost(proc.returncode, proc.stderr, results, before,
                                  "exemplar_latents.npy: the file is larger than this process may write")


@pytest.mark.parametrize("script, flags", [("compute_training_loss.py", STAGE1), ("compute_influence.py", STAGE2)])
def test_two_processes_on_one_task_file_share_the_work(tiny_copy, tmp_path, script, flags):
    results = tmp_path / "results"
    if script == "compute_influence.py":
        compute_training_loss.main(paths(tiny_copy, results) + STAGE1)
    cmd = python_command(script) + paths(tiny_copy, results) + flags
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    done = [line.split(" -> ")[-1] for out, _ in outs for line in out.splitlines() if " -> " in line]
    assert len(done) == len(set(done)) == (2 if script == "compute_training_loss.py" else 4)  # nothing done twice
    assert not list(results.rglob("*.claim")) and not list(results.rglob("*.tmp-*"))
    reference = tmp_path / "reference"
    if script == "compute_influence.py":
        shutil.copytree(results / "orig_loss", reference / "orig_loss")
    run_single = compute_training_loss.main if script == "compute_training_loss.py" else compute_influence.main
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_single(paths(tiny_copy, reference) + flags)
    finally:
        torch.set_num_threads(threads)
    for rel in snapshot(results):
        if rel.endswith(".npy"):
            assert np.array_equal(np.load(results / rel), np.load(reference / rel)), rel


# ------------------------------------------------------------------------------------------ interruption
@pytest.fixture(scope="module")
def kill_bench(tiny_abc, tmp_path_factory):
    """One benchmark copy and one results path for every kill case (same paths: byte-identical outputs), and
    the files of an uninterrupted run of both stages there."""
    root = tmp_path_factory.mktemp("kill")
    shutil.copytree(tiny_abc["dataroot"], root / "abc")
    shutil.copy(tiny_abc["task_json"], root / "tasks.json")
    bench = {"sd_version": tiny_abc["sd_version"], "dataroot": str(root / "abc"), "task_json": str(root / "tasks.json")}
    results = root / "results"
    for script, flags in (("compute_training_loss.py", STAGE1), ("compute_influence.py", STAGE2)):
        assert cli(script, paths(bench, results) + flags).returncode == 0
    reference = snapshot(results)
    shutil.rmtree(results)
    return bench, results, reference


KILLS = [  # (stage killed, where)
    ("compute_training_loss.py", "loss-batch:10"),  # during the second model's loss tracking
    ("compute_training_loss.py", "wrote:laion_loss_by_t.npy:2"),  # between two files of the second model's cache
    ("compute_influence.py", "unlearning-step:5"),  # during the second query's unlearning
    ("compute_influence.py", "loss-batch:20"),  # during a query's loss tracking
    ("compute_influence.py", "wrote:laion_loss.npy:2"),  # between two files of the second query
]


@pytest.mark.parametrize("script, point", KILLS, ids=[f"{s[8:-3]} at {p}" for s, p in KILLS])
def test_a_killed_run_resumes_to_the_uninterrupted_files(kill_bench, script, point):
    bench, results, reference = kill_bench
    shutil.rmtree(results, ignore_errors=True)
    if script == "compute_influence.py":
        assert cli("compute_training_loss.py", paths(bench, results) + STAGE1).returncode == 0
    flags = STAGE1 if script == "compute_training_loss.py" else STAGE2
    proc = cli(script, paths(bench, results) + flags, env={"ABU_KILL_AT": point})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    marker = "settings.json" if script == "compute_training_loss.py" else "influence.pkl"
    finished = {p: p.stat().st_mtime_ns for p in results.rglob(marker)}
    assert finished  # something of the killed stage was finished before the kill, and must not be redone
    for s, f in (("compute_training_loss.py", STAGE1), ("compute_influence.py", STAGE2)):
        assert cli(s, paths(bench, results) + f).returncode == 0
    assert all(p.stat().st_mtime_ns == t for p, t in finished.items())
    after = snapshot(results)
    assert sorted(after) == sorted(reference) and all(after[k] == reference[k] for k in reference)


# ------------------------------------------------------------------------------------------ errors that name the cause
def test_a_device_that_is_not_there_is_named_with_the_ones_that_are(tiny_copy, tmp_path):
    results = tmp_path / "results"
    flags = [f for f in STAGE1 if f != "cpu" and f != "--device"]
    for script, extra in (("compute_training_loss.py", flags), ("compute_influence.py", STAGE2[:-2]),
                          ("compute_fisher.py", None)):
        args = paths(tiny_copy, results) + extra if extra is not None else ["--dataroot", tiny_copy["dataroot"],
                                                                             "--sd_version", tiny_copy["sd_version"]]
        args = [a for a in args if a not in ("--device", "cpu")]
        for device, names in (("cuda", "available here: cpu"), ("cuda:7", "available here: cpu"),
                              ("gpu", "is not a torch device")):
            if device.startswith("cuda") and torch.cuda.is_available():
                continue
            proc = cli(script, args + ["--device", device])
            errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
            assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-1500:]
            assert f"--device {device}" in errors[0] or f"--device {device!r}" in errors[0]
            assert names in errors[0]
    assert not results.exists() or not any(results.rglob("*.npy"))


def test_a_dangling_link_among_the_candidate_images_is_named(tiny_copy, tmp_path):
    from utils.data import candidate_image_paths

    images = Path(tiny_copy["dataroot"]) / "laion_subset" / "images"
    first = sorted(images.iterdir())[0]
    first.rename(tmp_path / first.name)
    first.symlink_to(tmp_path / "gone" / first.name)
    with pytest.raises(Exception) as e:
        candidate_image_paths(images)
    assert first.name in str(e.value) and "point to nothing" in str(e.value)
    proc = cli("data/encode_candidates.py", ["--dataroot", tiny_copy["dataroot"], "--sd_version",
                                             tiny_copy["sd_version"], "--device", "cpu", "--overwrite"])
    assert proc.returncode == 2 and "point to nothing" in proc.stderr and first.name in proc.stderr, proc.stderr[-1500:]


def long_prompts(task_json, key: str, concept_first: bool) -> str:
    """Every entry's `key` padded to about 100 tokens, its <new1> first or past the text encoder's 77."""
    entries = json.loads(Path(task_json).read_text())
    padding = " ".join(["a picture of a fish"] * 20)
    for e in entries:
        e[key] = f"{e[key]} {padding}" if concept_first else f"{padding} {e[key]}"
    Path(task_json).write_text(json.dumps(entries))
    return entries[0][key]


def test_prompt_token_count_is_the_tokenizers_own_with_the_token_added(tiny_abc):
    import copy

    from utils.customization import prompt_token_count
    from utils.models import load_base_model

    tokenizer = load_base_model(tiny_abc["sd_version"], "cpu").tokenizer
    reference = copy.deepcopy(tokenizer)
    reference.add_tokens("<new1>")
    for prompt in ("<new1> fish", "a picture of a <new1> fish, a fish", "fish " * 90 + "<new1>", "a <new1>"):
        count, positions = prompt_token_count(tokenizer, prompt, ["<new1>"])
        ids = reference(prompt, truncation=False).input_ids
        assert count == len(ids)
        assert ids[positions["<new1>"]] == reference.convert_tokens_to_ids("<new1>")
    assert "<new1>" not in tokenizer.get_vocab()  # counted without changing the shared tokenizer


@pytest.mark.parametrize("key, script", [("prompt", "compute_influence.py"), ("train_prompt", "compute_training_loss.py")])
def test_a_prompt_whose_concept_token_would_be_cut_is_refused(finished, key, script):
    bench, results = finished
    before = snapshot(results)
    prompt = long_prompts(bench["task_json"], key, concept_first=False)
    flags = STAGE1 if script == "compute_training_loss.py" else STAGE2
    proc = cli(script, paths(bench, results) + flags + ["--overwrite"])
    assert_clear_and_nothing_lost(proc.returncode, proc.stderr, results, before, "would be cut off")
    assert repr(prompt) in proc.stderr and "reads 77" in proc.stderr


def test_a_long_prompt_with_its_token_early_runs_with_one_warning(tiny_copy, tmp_path):
    long_prompts(tiny_copy["task_json"], "prompt", concept_first=True)
    results = tmp_path / "results"
    proc = cli("compute_training_loss.py", paths(tiny_copy, results) + STAGE1)
    assert proc.returncode == 0, proc.stderr[-1500:]
    proc = cli("compute_influence.py", paths(tiny_copy, results) + STAGE2)
    assert proc.returncode == 0, proc.stderr[-1500:]
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:") and "tokens long" in line]
    assert len(warnings) == len({e["prompt"] for e in json.loads(Path(tiny_copy["task_json"]).read_text())})
