"""The per-query stopping rule (--stop_rule): it stops where told and records how far each query went."""
import pickle

import numpy as np
import pytest

import compute_influence
from helpers import paths, stage1_cache, stage2_flags

STAGE2 = stage2_flags(steps=6, accum=1, batch=4, n=300) + ["--stop_every", "2"]
QUERY = "imagenet/gpt/n01440764_0000/samples/00000.png"


@pytest.fixture(scope="module")
def cache(tiny_abc, tmp_path_factory):
    return stage1_cache(tiny_abc, tmp_path_factory.mktemp("stopping"))


def run(tiny_abc, cache, out, *flags):
    compute_influence.main(paths(tiny_abc, out) + STAGE2 + ["--loss_cache_dir", cache] + list(flags))
    return pickle.loads((out / "influence" / QUERY / "influence.pkl").read_bytes())


def test_a_target_the_first_check_meets_unlearns_nothing(tiny_abc, cache, tmp_path):
    r = run(tiny_abc, cache, tmp_path / "met", "--stop_rule", "rise", "--stop_target", "1.0")
    assert r["unlearn_steps_taken"] == 0 and r["stop"]["stopped_early"]
    assert [c["step"] for c in r["stop"]["checks"]] == [0]
    assert not r["influence"].any() and r["query_loss"][0] == r["query_loss"][1]  # nothing moved
    assert r["forward_equivalents"]["unlearning"] == 0


def test_an_unreachable_target_runs_the_whole_schedule(tiny_abc, cache, tmp_path):
    r = run(tiny_abc, cache, tmp_path / "never", "--stop_rule", "rise", "--stop_target", "1e6")
    assert r["unlearn_steps_taken"] == 6 and not r["stop"]["stopped_early"]
    assert [c["step"] for c in r["stop"]["checks"]] == [0, 2, 4]
    plain = run(tiny_abc, cache, tmp_path / "plain")  # the same steps as no rule at all
    assert np.array_equal(plain["influence"], r["influence"]) and plain["stop"] is None


def test_the_rise_rule_stops_at_the_first_check_that_meets_its_target(tiny_abc, cache, tmp_path):
    probe = run(tiny_abc, cache, tmp_path / "probe", "--stop_rule", "rise", "--stop_target", "1e6")
    ratios = [c["query_ratio"] for c in probe["stop"]["checks"]]
    assert ratios[0] == 1.0 and ratios[1] < ratios[2]  # the query's loss rises with the steps
    target = (ratios[1] + ratios[2]) / 2  # reached at step 4, not at step 2
    r = run(tiny_abc, cache, tmp_path / "mid", "--stop_rule", "rise", "--stop_target", str(target))
    assert r["unlearn_steps_taken"] == 4 and r["stop"]["checks"][-1]["query_ratio"] >= target
    assert all(c["query_ratio"] < target for c in r["stop"]["checks"][:-1])


def test_the_collateral_rule_records_the_reference_rise(tiny_abc, cache, tmp_path):
    r = run(tiny_abc, cache, tmp_path / "coll", "--stop_rule", "collateral", "--stop_target", "1e6",
            "--stop_reference", "4")
    checks = r["stop"]["checks"]
    assert [c["step"] for c in checks] == [2, 4] and all("collateral" in c for c in checks)  # none before a step
    assert r["forward_equivalents"]["stopping checks"] == 2 * (1 + 4) * 5
