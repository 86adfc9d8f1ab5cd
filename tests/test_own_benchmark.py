"""A user's own benchmark: their candidates encoded by data/encode_candidates.py, their own test case, the whole
route (candidates -> Fisher -> stage 1 -> stage 2 -> evaluate) as the README shows it."""
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import compute_fisher
from benchmarks.runner import python_command
import compute_influence
import compute_training_loss
import evaluate
import utils.candidate_arrays
from utils.candidate_arrays import encode_candidates
from utils.errors import InputError
from utils.models import load_base_model

REPO = Path(__file__).resolve().parent.parent
ARRAYS = ("laion_latents.npy", "laion_text_embeddings.npy")


def fresh_benchmark(tiny_abc, tmp_path) -> Path:
    """The tiny benchmark's images, captions, models and ground truth, without the derived arrays and Fisher."""
    root = tmp_path / "mine"
    shutil.copytree(tiny_abc["dataroot"], root, ignore=shutil.ignore_patterns("*.npy", "sd_fisher*", "encode_*"))
    return root


def test_encoding_script_equals_the_builders_arrays(tiny_abc, tmp_path):
    root = fresh_benchmark(tiny_abc, tmp_path)
    proc = subprocess.run(python_command("data/encode_candidates.py") + ["--dataroot", str(root),
                           "--sd_version", tiny_abc["sd_version"], "--device", "cpu", "--batch_size", "5"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for name in ARRAYS:  # another batch size, the same rows: row r's noise is seeded by r alone
        assert np.array_equal(np.load(root / name), np.load(Path(tiny_abc["dataroot"]) / name)), name
    latents = np.load(root / ARRAYS[0])
    assert latents.shape == (24, 4, 8, 8) and np.load(root / ARRAYS[1]).shape == (12, 77, 32)
    assert not list(root.glob("*.partial")) and not (root / utils.candidate_arrays.PROGRESS).exists()


def test_a_stopped_encoding_resumes_to_the_same_arrays(tiny_abc, tmp_path, monkeypatch):
    root = fresh_benchmark(tiny_abc, tmp_path)
    base = load_base_model(tiny_abc["sd_version"], "cpu")
    images, captions = root / "laion_subset" / "images", root / "laion_subset" / "captions.txt"
    real_save, calls = utils.candidate_arrays.save_json, []

    def die_after_the_first_batch(path, obj):
        real_save(path, obj)
        calls.append(obj.get("done"))
        if obj.get("done") == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(utils.candidate_arrays, "save_json", die_after_the_first_batch)
    with pytest.raises(KeyboardInterrupt):
        encode_candidates(base, images, captions, root, batch_size=4)
    monkeypatch.setattr(utils.candidate_arrays, "save_json", real_save)
    assert calls == [0, 4] and not (root / ARRAYS[0]).exists()
    encode_candidates(base, images, captions, root, batch_size=4)
    for name in ARRAYS:
        assert np.array_equal(np.load(root / name), np.load(Path(tiny_abc["dataroot"]) / name)), name


def test_mismatched_captions_are_refused(tiny_abc, tmp_path):
    root = fresh_benchmark(tiny_abc, tmp_path)
    captions = root / "laion_subset" / "captions.txt"
    captions.write_text("\n".join(captions.read_text().splitlines()[:-1]) + "\n")
    with pytest.raises(InputError, match="11 caption lines but .* has 12 images"):
        encode_candidates(load_base_model(tiny_abc["sd_version"], "cpu"), root / "laion_subset" / "images", captions,
                          root)



def test_captions_split_on_newlines_only(tiny_abc, tmp_path):
    """A caption may hold U+2028, U+0085 or a form feed (str.splitlines would split there), and the last caption may
    be empty: 12 lines stay 12 captions, each on its own image's row."""
    from utils.candidate_arrays import read_captions

    captions = tmp_path / "captions.txt"
    lines = [f"caption {i}" for i in range(11)] + [""]
    lines[2], lines[5], lines[7] = "a line\u2028separator", "a next\u0085line", "a form\x0cfeed"
    captions.write_bytes(("\n".join(lines) + "\n").encode("utf-8"))
    assert read_captions(captions, 12, "images") == lines
    base = load_base_model(tiny_abc["sd_version"], "cpu")
    root = fresh_benchmark(tiny_abc, tmp_path)
    shutil.copy(captions, root / "laion_subset" / "captions.txt")
    encode_candidates(base, root / "laion_subset" / "images", root / "laion_subset" / "captions.txt", root)
    text = np.load(root / ARRAYS[1])
    from utils.encoders import encode_prompt
    np.testing.assert_allclose(text[7], encode_prompt(base.tokenizer, base.text_encoder, lines[7])[0].numpy(),
                               rtol=1e-5, atol=1e-6)


def test_a_hidden_file_among_the_candidate_images_changes_nothing(tiny_copy, tmp_path):
    """A .DS_Store (or ._name) in the image folder is not a candidate: the pictures, the pixel baseline and the
    encoding all list the candidates through utils.data.candidate_image_paths."""
    import compute_baselines
    from utils.data import laion_image_paths

    root = Path(tiny_copy["dataroot"])
    before = laion_image_paths(root)
    for name in (".DS_Store", f"._{before[0].name}", "notes.txt"):
        (root / "laion_subset" / "images" / name).write_bytes(b"\x00\x01junk")
    assert laion_image_paths(root) == before
    flags = ["--sd_version", tiny_copy["sd_version"], "--dataroot", str(root), "--task_json", tiny_copy["task_json"],
             "--laion_subset_size", "12", "--method", "pixel"]
    compute_baselines.main(flags + ["--result_dir", str(tmp_path / "pixel")])
    results = sorted((tmp_path / "pixel" / "influence").rglob("influence.pkl"))
    assert len(results) == 4
    before[0].unlink()  # one image fewer than the arrays hold: refused
    with pytest.raises(InputError, match="holds 11 images but the candidate arrays .* hold 12"):
        compute_baselines.main(flags + ["--result_dir", str(tmp_path / "pixel2")])


def test_derived_arrays_made_from_other_sources_are_remade(tiny_abc, tmp_path, capsys):
    root = fresh_benchmark(tiny_abc, tmp_path)
    base = load_base_model(tiny_abc["sd_version"], "cpu")
    images, captions = root / "laion_subset" / "images", root / "laion_subset" / "captions.txt"
    encode_candidates(base, images, captions, root)
    first = np.load(root / ARRAYS[1])
    encode_candidates(base, images, captions, root)  # same sources: kept
    assert "exist; pass --overwrite" in capsys.readouterr().out
    lines = captions.read_text().split("\n")
    captions.write_text("\n".join(["a different first caption"] + lines[1:]))
    encode_candidates(base, images, captions, root)
    assert "captions changed" in capsys.readouterr().out
    remade = np.load(root / ARRAYS[1])
    assert not np.array_equal(remade[0], first[0]) and np.array_equal(remade[1:], first[1:])

def test_own_test_case_end_to_end(tiny_abc, tmp_path):
    """json/test_mine.json, not one of AbC's four: runs through both stages and is scored as its own family."""
    root = fresh_benchmark(tiny_abc, tmp_path)
    common = ["--sd_version", tiny_abc["sd_version"], "--dataroot", str(root), "--laion_subset_size", "12",
              "--device", "cpu"]
    subprocess.run(python_command("data/encode_candidates.py") + common[:4] + ["--device", "cpu"],
                   check=True, capture_output=True, cwd=REPO, timeout=300)
    compute_fisher.main(common + ["--num_samples", "24", "--batch_size", "8"])
    (root / "json" / "test_mine.json").write_text((root / "json" / "test_unobserved_imagenet.json").read_text())
    tasks = [dict(t, test_case="test_mine") for t in json.loads(Path(tiny_abc["task_json"]).read_text())
             if t["test_case"] == "test_unobserved_imagenet"]
    task_json = tmp_path / "mine_tasks.json"
    task_json.write_text(json.dumps(tasks))
    results = ["--task_json", str(task_json), "--result_dir", str(tmp_path / "results")]
    compute_training_loss.main(common + results + ["--batch_size", "20", "--time_samples", "5"])
    compute_influence.main(common + results + ["--loss_batch_size", "20", "--loss_time_samples", "5",
                                               "--unlearn_steps", "2", "--unlearn_grad_accum_steps", "1",
                                               "--unlearn_batch_size", "2", "--fisher_dataset_size", "1000"])
    evaluate.main(results)
    summary = (tmp_path / "results" / "eval" / "mine_tasks" / "summary.md").read_text()
    assert "| test_mine | 2 |" in summary and "| family: mine | 2 |" in summary and "| all | 2 |" in summary
