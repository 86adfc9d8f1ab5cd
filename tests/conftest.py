"""Shared fixtures: one tiny SD-format model and AbC-layout dataroot per test session."""
import shutil

import pytest

from data.build_tiny_abc import build


@pytest.fixture(scope="session")
def tiny_abc(tmp_path_factory):
    """Paths of the tiny benchmark: sd_version, dataroot, task_json (read-only: copy before changing)."""
    return build(tmp_path_factory.mktemp("tiny") / "bench", seed=0)


@pytest.fixture
def tiny_copy(tiny_abc, tmp_path):
    """A private copy of the tiny dataroot and task file that a test may damage."""
    root = tmp_path / "abc"
    shutil.copytree(tiny_abc["dataroot"], root)
    task_json = tmp_path / "tasks.json"
    shutil.copy(tiny_abc["task_json"], task_json)
    return {"sd_version": tiny_abc["sd_version"], "dataroot": str(root), "task_json": str(task_json)}


@pytest.fixture
def base_model(tiny_abc):
    """A fresh base model (tests change its weights)."""
    from utils.models import load_base_model

    return load_base_model(tiny_abc["sd_version"], "cpu")
