"""Offline checks of data/download_abc.sh: flags, the 7z check, the task step, extract and verify."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = "data/download_abc.sh"

VALID_TASK = {
    "synth_image_path": "synth/imagenet/gpt/n01440764_0000/samples/00000.png",
    "prompt": "A school of <new1> fish swimming in the ocean",
    "test_case": "test_unobserved_imagenet",
    "test_case_ind": 0,
    "model_path": "models/imagenet/n01440764_0000",
    "train_prompt": "<new1> fish",
    "category": "fish",
}


def run_script(*args, env_extra=None):
    env = dict(os.environ, PYTHON=sys.executable)
    env.update(env_extra or {})
    proc = subprocess.run(["bash", SCRIPT, *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    proc.output = proc.stdout + proc.stderr
    return proc


def test_help_lists_steps():
    proc = run_script("--help")
    assert proc.returncode == 0
    for step in ("check", "hub", "extract", "tasks", "verify"):
        assert step in proc.stdout


def test_unknown_flag_fails():
    proc = run_script("--no-such-flag")
    assert proc.returncode != 0
    assert "unknown argument" in proc.output


def test_unknown_step_fails(tmp_path):
    proc = run_script("--dataroot", str(tmp_path), "--only", "tasks,frobnicate")
    assert proc.returncode != 0
    assert "frobnicate" in proc.output


def test_missing_7z_says_how_to_install(tmp_path):
    proc = run_script("--dataroot", str(tmp_path / "abc"), "--only", "extract",
                      env_extra={"SEVEN_ZIP": "/nonexistent/7z"})
    assert proc.returncode != 0
    assert "p7zip" in proc.output
    assert not (tmp_path / "abc" / ".download_done_extract").exists()


def test_tasks_from_local_file_then_skip(tmp_path):
    src = tmp_path / "src.json"
    src.write_text(json.dumps([VALID_TASK]))
    out = tmp_path / "tasks" / "all_tasks.json"
    env = {"ABC_TASKS_OUT": str(out)}
    proc = run_script("--dataroot", str(tmp_path / "abc"), "--only", "tasks", "--tasks-source", str(src),
                      env_extra=env)
    assert proc.returncode == 0, proc.output
    assert json.loads(out.read_text()) == [VALID_TASK]
    assert not list(out.parent.glob("*.tmp*"))

    proc = run_script("--dataroot", str(tmp_path / "abc"), "--only", "tasks", "--tasks-source", str(src),
                      env_extra=env)
    assert proc.returncode == 0, proc.output
    assert "skip tasks" in proc.output


@pytest.mark.parametrize("content, problem", [
    ("[{not json", "not valid JSON"),
    (json.dumps([dict(VALID_TASK, test_case="test_nonsense")]), "unknown test_case"),
    (json.dumps([{k: v for k, v in VALID_TASK.items() if k != "prompt"}]), "missing key"),
])
def test_bad_task_file_writes_nothing(tmp_path, content, problem):
    src = tmp_path / "bad.json"
    src.write_text(content)
    out = tmp_path / "tasks" / "all_tasks.json"
    proc = run_script("--only", "tasks", "--tasks-source", str(src), env_extra={"ABC_TASKS_OUT": str(out)})
    assert proc.returncode != 0
    assert problem in proc.output
    assert "tasks" in proc.output
    assert not out.exists()
    assert not out.parent.exists() or not any(out.parent.iterdir())  # no temp file left either


def test_missing_task_source_fails(tmp_path):
    out = tmp_path / "all_tasks.json"
    proc = run_script("--only", "tasks", "--tasks-source", str(tmp_path / "nope.json"),
                      env_extra={"ABC_TASKS_OUT": str(out)})
    assert proc.returncode != 0
    assert "nope.json" in proc.output
    assert not out.exists()


FOLDERS = ["exemplar", "synth", "models", "laion_subset/images"]
FILES = ["laion_subset/captions.txt", "json/test_artchive.json", "json/test_bamfg.json",
         "json/test_observed_imagenet.json", "json/test_unobserved_imagenet.json",
         "laion_latents.npy", "laion_text_embeddings.npy"]


def test_verify_empty_dataroot_lists_missing(tmp_path):
    proc = run_script("--dataroot", str(tmp_path), "--only", "verify")
    assert proc.returncode != 0
    for item in FOLDERS + FILES:
        assert item in proc.output


def test_verify_complete_dataroot_warns_about_fisher(tmp_path):
    for d in FOLDERS:
        (tmp_path / d).mkdir(parents=True)
        (tmp_path / d / "x").write_text("x")
    for f in FILES:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text("x")
    proc = run_script("--dataroot", str(tmp_path), "--only", "verify")
    assert proc.returncode == 0, proc.output
    assert "sd_fisher.pt" in proc.output and "compute_fisher.py" in proc.output
    assert "missing file" not in proc.output

    (tmp_path / "laion_latents.npy").unlink()
    proc = run_script("--dataroot", str(tmp_path), "--only", "verify")
    assert proc.returncode != 0
    assert "laion_latents.npy" in proc.output


FAKE_HUB = """
import json, os
from pathlib import Path

def snapshot_download(repo_id, repo_type, local_dir, allow_patterns, cache_dir):
    with open(os.environ["FAKE_HUB_LOG"], "a") as f:
        f.write(json.dumps([repo_id, str(local_dir), allow_patterns]) + "\\n")
    local_dir = Path(local_dir)
    if repo_id == "sywang/GenDataAttribution":
        (local_dir / "json").mkdir(parents=True, exist_ok=True)
        (local_dir / "json" / "test_bamfg.json").write_text("[]")
    else:
        (local_dir / "abc" / "laion_latents_text_embeddings").mkdir(parents=True, exist_ok=True)
        (local_dir / "abc" / "laion_latents_text_embeddings" / "part").write_text("p")
        (local_dir / "abc" / "sd_fisher.pt").write_text("f")
"""


@pytest.mark.parametrize("name", ["abc", "mydata"])
def test_hub_layout_with_fake_hub(tmp_path, name):
    fake = tmp_path / "fake"
    (fake / "huggingface_hub").mkdir(parents=True)
    (fake / "huggingface_hub" / "__init__.py").write_text(FAKE_HUB)
    log = tmp_path / "hub.log"
    root = tmp_path / "data" / name
    env = {"PYTHONPATH": str(fake), "FAKE_HUB_LOG": str(log)}
    proc = run_script("--dataroot", str(root), "--only", "hub", env_extra=env)
    assert proc.returncode == 0, proc.output
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert [c[0] for c in calls] == ["sywang/GenDataAttribution", "sywang/AttributeByUnlearning"]
    assert "models_test/*" in calls[0][2] and calls[1][2] == ["abc/*"]
    assert (root / "json" / "test_bamfg.json").is_file()
    assert (root / "sd_fisher.pt").is_file()
    assert (root / "laion_latents_text_embeddings" / "part").is_file()
    assert (root / ".download_done_hub").exists()
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [name]  # no staging folder left

    proc = run_script("--dataroot", str(root), "--only", "hub", env_extra=env)
    assert proc.returncode == 0 and "skip hub" in proc.output
    assert len(log.read_text().splitlines()) == 2


def test_failed_hub_gets_no_marker(tmp_path):
    fake = tmp_path / "fake"
    (fake / "huggingface_hub").mkdir(parents=True)
    (fake / "huggingface_hub" / "__init__.py").write_text(
        "def snapshot_download(**kw):\n    raise OSError('network is unreachable')\n")
    root = tmp_path / "abc"
    proc = run_script("--dataroot", str(root), "--only", "hub", env_extra={"PYTHONPATH": str(fake)})
    assert proc.returncode != 0
    assert "network is unreachable" in proc.output and "hub" in proc.output
    assert not (root / ".download_done_hub").exists()


needs_7z = pytest.mark.skipif(shutil.which("7z") is None, reason="7z not installed (apt install p7zip-full)")


@needs_7z
def test_extract_multipart_archive(tmp_path):
    staging = tmp_path / "staging"
    (staging / "models" / "x").mkdir(parents=True)
    payload = os.urandom(3000)  # incompressible, so the 1 KiB volumes give several parts
    (staging / "models" / "x" / "file.txt").write_bytes(payload)
    root = tmp_path / "abc"
    (root / "models_test").mkdir(parents=True)
    subprocess.run(["7z", "a", "-v1k", str(root / "models_test" / "models_test.7z"), "models"],
                   cwd=staging, check=True, capture_output=True)
    assert len(list((root / "models_test").glob("models_test.7z.*"))) > 1

    proc = run_script("--dataroot", str(root), "--only", "extract")
    assert proc.returncode == 0, proc.output
    assert (root / "models" / "x" / "file.txt").read_bytes() == payload
    assert not (root / "models_test").exists()
    assert (root / ".download_done_extract").exists()

    proc = run_script("--dataroot", str(root), "--only", "extract")
    assert proc.returncode == 0
    assert "skip extract" in proc.output


@needs_7z
def test_failed_extract_keeps_parts(tmp_path):
    root = tmp_path / "abc"
    (root / "synth_test").mkdir(parents=True)
    part = root / "synth_test" / "synth_test.7z.001"
    part.write_bytes(b"this is not a 7z archive")
    proc = run_script("--dataroot", str(root), "--only", "extract")
    assert proc.returncode != 0
    assert "synth_test.7z.001" in proc.output
    assert part.exists()
    assert not (root / ".download_done_extract").exists()


# ---------------------------------------------------------------- interrupted downloads and extractions
RESUMABLE_HUB = """
import os
from pathlib import Path

FILES = {"GenDataAttribution": ["json/test_bamfg.json", "exemplar/a.png", "exemplar/b.png"],
         "AttributeByUnlearning": ["abc/sd_fisher.pt", "abc/laion_latents_text_embeddings/part"]}

fetched = []


def snapshot_download(repo_id, repo_type, local_dir, allow_patterns, cache_dir):
    # as the real one: files already present are kept, the missing ones fetched; FAKE_HUB_DIE_AFTER stops
    # the process for good (os._exit, as a kill would) after that many new files, counted over both repositories
    for rel in FILES[repo_id.split("/")[1]]:
        target = Path(local_dir) / rel
        if target.exists():
            continue
        if len(fetched) == int(os.environ.get("FAKE_HUB_DIE_AFTER", "-1")):
            os._exit(137)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(repo_id + ":" + rel)
        fetched.append(rel)
"""


def tree(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("die_after", [1, 4])  # in the first repository, in the second
def test_an_interrupted_download_resumes_to_the_same_files(tmp_path, die_after):
    fake = tmp_path / "fake"
    (fake / "huggingface_hub").mkdir(parents=True)
    (fake / "huggingface_hub" / "__init__.py").write_text(RESUMABLE_HUB)
    whole, cut = tmp_path / "whole" / "abc", tmp_path / "cut" / "abc"
    assert run_script("--dataroot", str(whole), "--only", "hub", env_extra={"PYTHONPATH": str(fake)}).returncode == 0
    proc = run_script("--dataroot", str(cut), "--only", "hub",
                      env_extra={"PYTHONPATH": str(fake), "FAKE_HUB_DIE_AFTER": str(die_after)})
    assert proc.returncode != 0 and not (cut / ".download_done_hub").exists()
    assert run_script("--dataroot", str(cut), "--only", "hub", env_extra={"PYTHONPATH": str(fake)}).returncode == 0
    assert tree(cut) == tree(whole)


@needs_7z
def test_an_interrupted_extraction_resumes_to_the_same_files(tmp_path):
    payloads = {"exemplar": os.urandom(3000), "models_test": os.urandom(3000)}  # incompressible: several parts

    def archives(root):
        for name, payload in payloads.items():
            folder = name.replace("_test", "")
            staging = tmp_path / "staging" / root.parent.name / name
            (staging / folder).mkdir(parents=True)
            (staging / folder / "f.bin").write_bytes(payload)
            (root / name).mkdir(parents=True)
            subprocess.run(["7z", "a", "-v1k", str(root / name / f"{name}.7z"), folder], cwd=staging, check=True,
                           capture_output=True)

    whole, cut = tmp_path / "whole" / "abc", tmp_path / "cut" / "abc"
    archives(whole)
    archives(cut)
    assert run_script("--dataroot", str(whole), "--only", "extract").returncode == 0
    killer = tmp_path / "7z_killed"  # a 7z killed right after unpacking, before the script deletes any part
    killer.write_text('#!/usr/bin/env bash\n7z "$@"\nkill -9 $$\n')
    killer.chmod(0o755)
    proc = run_script("--dataroot", str(cut), "--only", "extract", env_extra={"SEVEN_ZIP": str(killer)})
    assert proc.returncode != 0 and not (cut / ".download_done_extract").exists()
    assert run_script("--dataroot", str(cut), "--only", "extract").returncode == 0
    assert tree(cut) == tree(whole) and (cut / "exemplar" / "f.bin").read_bytes() == payloads["exemplar"]
