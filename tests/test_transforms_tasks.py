import json

import numpy as np
import pytest
import torch
from PIL import Image

from utils.errors import InputError
from utils.tasks import Task, exemplar_paths, load_tasks, unique_models
from utils.transforms import load_image_tensor, resize_center_crop, to_model_input

TASK = {"synth_image_path": "synth/imagenet/gpt/c/samples/00000.png", "prompt": "a <new1> fish",
        "test_case": "test_unobserved_imagenet", "test_case_ind": 0, "model_path": "models/imagenet/c",
        "train_prompt": "<new1> fish", "category": "fish"}


def test_resize_center_crop_matches_torchvision_rules():
    img = Image.new("RGB", (30, 20))
    out = resize_center_crop(img, 10)  # shorter side 20 -> 10, longer 30 -> 15, crop offset round(2.5) = 2
    assert out.size == (10, 10)
    arr = np.zeros((20, 30, 3), np.uint8)
    arr[:, :15] = 255  # left half white
    out = np.asarray(resize_center_crop(Image.fromarray(arr), 10))
    assert out[:, :5].min() == 255 and out[:, 6:].max() == 0  # columns 2..6 of the 15-wide image are white


def test_model_input_range_and_flip(tmp_path):
    arr = np.zeros((8, 8, 3), np.uint8)
    arr[:, :4] = 255
    Image.fromarray(arr).save(tmp_path / "a.png")
    x = load_image_tensor(tmp_path / "a.png", 8)
    assert x.shape == (3, 8, 8) and x.min() == -1 and x.max() == 1
    assert torch.equal(load_image_tensor(tmp_path / "a.png", 8, flip=True), x.flip(-1))
    assert to_model_input(Image.new("RGB", (2, 2), (255, 0, 128))).tolist()[0][0][0] == 1.0


def write(tmp_path, obj, raw=None):
    p = tmp_path / "tasks.json"
    p.write_text(raw if raw is not None else json.dumps(obj))
    return p


def test_load_tasks_and_keys(tmp_path):
    tasks = load_tasks(write(tmp_path, [TASK, dict(TASK, synth_image_path="synth/x/00001.png")]))
    assert tasks[0] == Task(**TASK)
    assert tasks[0].model_key == "imagenet/c"
    assert tasks[0].query_key == "imagenet/gpt/c/samples/00000.png"
    assert tasks[0].family == "object"
    assert len(unique_models(tasks)) == 1
    mine = load_tasks(write(tmp_path, [dict(TASK, test_case="test_mine")]))[0]  # a user's own test case
    assert mine.family == "mine"


@pytest.mark.parametrize("obj, raw, message", [
    (None, "[{", "not valid JSON"),
    ({}, None, "non-empty JSON list"),
    ([{k: v for k, v in TASK.items() if k != "prompt"}], None, "missing key"),
    ([dict(TASK, test_case="../test_x")], None, "must name a file json/<test_case>.json"),
    ([dict(TASK, test_case_ind="0")], None, "'test_case_ind' must be a int"),
])
def test_malformed_task_files_name_the_problem(tmp_path, obj, raw, message):
    with pytest.raises(InputError, match=message):
        load_tasks(write(tmp_path, obj, raw))


def test_exemplar_paths_errors(tmp_path):
    task = Task(**TASK)
    with pytest.raises(InputError, match="test-case file not found"):
        exemplar_paths(tmp_path, task)
    (tmp_path / "json").mkdir()
    (tmp_path / "json" / "test_unobserved_imagenet.json").write_text(json.dumps([{"exemplar": ["dataset/e/1.png"]}]))
    with pytest.raises(InputError, match="exemplar image"):
        exemplar_paths(tmp_path, task)
    (tmp_path / "e").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "e" / "1.png")
    assert exemplar_paths(tmp_path, task) == [tmp_path / "e" / "1.png"]
    with pytest.raises(InputError, match="has 1 entries"):
        exemplar_paths(tmp_path, Task(**dict(TASK, test_case_ind=3)))
