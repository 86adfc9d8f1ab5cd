"""Settings declared once (utils/settings.py): every field is a flag, is recorded beside the result, and a change of
any field that acts on the result stops a finished query from being reused, with no list of names kept by hand."""
import pickle
from dataclasses import dataclass, fields

import pytest

import compute_influence
import compute_training_loss
from helpers import STAGE1, paths, stage2_flags
from utils.errors import InputError
from utils.settings import (CommonSettings, InfluenceSettings, RankingSettings, ScreeningSettings, StoppingSettings,
                            TrainingLossSettings, changed_settings, field_default, parse_settings, record,
                            setting)

QUERY = "imagenet/gpt/n01440764_0000/samples/00000.png"
# what each switch must be set to for the fields it gates to act (ScreeningSettings.idle, StoppingSettings.idle)
SWITCHES = {ScreeningSettings: ["--mode", "two-stage"], StoppingSettings: ["--stop_rule", "rise"],
            RankingSettings: ["--ranking", "combined"]}
FIELD_SWITCHES = {"keep_margin": ["--keep_top", "4"]}  # a switch inside ScreeningSettings


@pytest.fixture(scope="module")
def finished(tiny_abc, tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    compute_training_loss.main(paths(tiny_abc, results) + STAGE1)
    compute_influence.main(paths(tiny_abc, results) + stage2_flags(steps=1, accum=1, batch=2))
    return results


def result_fields():
    """(class, field) of every setting recorded with a query's result."""
    return [(f.type, g) for f in fields(InfluenceSettings) if f.name != "execution" for g in fields(f.type)]


def another_value(f, now):
    """A valid value of field `f` other than `now`, as a command-line string (None for a switch)."""
    if isinstance(now, bool):
        return None
    if f.metadata["choices"]:
        return str(next(c for c in f.metadata["choices"] if c not in (now, "auto")))
    if f.name == "loss_batch_size":
        return "40"  # still a multiple of T = 5
    if f.name == "loss_time_samples":
        return "4"  # 20 is a multiple of 4
    if now is None or isinstance(now, int):  # None: --fisher_floor, off by default
        return str((now or 0) + 1)
    if isinstance(now, float):
        return str(now * 2)
    return f"{now}-other"


def test_every_setting_is_a_flag_and_is_recorded(finished):
    recorded = pickle.loads((finished / "influence" / QUERY / "influence.pkl").read_bytes())["settings"]
    assert list(recorded) == [g.name for _, g in result_fields()]  # all of them, in declaration order
    assert recorded["unlearn_steps"] == 1 and recorded["precision"] == "fp32"  # 'auto' is recorded resolved
    parsed = parse_settings(InfluenceSettings, "", ["--task_json", "t.json"])
    assert record(*parsed.result).keys() == recorded.keys()


@pytest.mark.parametrize("cls_field", [pytest.param(cf, id=cf[1].name) for cf in result_fields()
                                       if cf[1].metadata["compared"]])
def test_a_change_of_any_compared_setting_is_not_skipped(cls_field, finished, tiny_abc, capsys):
    cls, f = cls_field
    recorded = pickle.loads((finished / "influence" / QUERY / "influence.pkl").read_bytes())["settings"]
    value = another_value(f, recorded[f.name])
    argv = paths(tiny_abc, finished) + stage2_flags(steps=1, accum=1, batch=2) + SWITCHES.get(cls, []) + \
        FIELD_SWITCHES.get(f.name, [])
    if f"--{f.name}" in argv:  # replace the helper's value
        argv[argv.index(f"--{f.name}") + 1] = value
    else:
        argv += [f"--{f.name}"] + ([] if value is None else [value])
    with pytest.raises(InputError, match="made with other settings") as e:
        compute_influence.main(argv)
    assert f"{f.name}: result has" in str(e.value)


@pytest.mark.parametrize("flag", [["--vae_batch_size", "7"], ["--screen_batch_size", "3"],
                                  ["--stop_target", "9.0"], ["--screen", "first-order"]])
def test_settings_that_cannot_change_the_result_do_not_block_reuse(flag, finished, tiny_abc, capsys):
    """Memory-only fields, and fields whose switch is off (no stopping rule, exact scoring), are not compared."""
    compute_influence.main(paths(tiny_abc, finished) + stage2_flags(steps=1, accum=1, batch=2) + flag)
    assert "4 done, 0 to do" in capsys.readouterr().out


def test_a_new_field_is_recorded_and_compared_without_being_listed():
    @dataclass(frozen=True)
    class Extra:
        new_knob: float = setting(0.5, "a setting added later")

    assert record(CommonSettings(task_json="t"), Extra())["new_knob"] == 0.5
    assert changed_settings({"new_knob": 0.5}, Extra(new_knob=0.7)) == ["new_knob: result has 0.5, this run uses 0.7"]
    assert changed_settings({}, Extra()) == []  # a record written before the field existed holds its default
    assert changed_settings({}, Extra(new_knob=1.0)) == ["new_knob: result has 0.5, this run uses 1.0"]


def test_both_stages_build_the_same_loss_measurement():
    stage1 = parse_settings(TrainingLossSettings, "", ["--task_json", "t", "--batch_size", "40", "--time_samples",
                                                       "4", "--seed", "3", "--device", "cpu"])
    stage2 = parse_settings(InfluenceSettings, "", ["--task_json", "t", "--loss_batch_size", "40",
                                                    "--loss_time_samples", "4", "--seed", "3", "--device", "cpu"])
    assert stage1.measurement() == stage2.measurement()
    assert stage1.measurement().precision == "fp32"


@pytest.mark.parametrize("argv, message", [
    (["--loss_batch_size", "21"], "multiple of the number of time samples"),
    (["--mode", "two-stage", "--screen_time_samples", "11"], "--screen_time_samples must be between 1"),
    (["--mode", "two-stage", "--screen", "first-order", "--weight_selection", "all"], "needs nn.Linear weights"),
    (["--stop_rule", "rise", "--stop_every", "0"], "--stop_every and --stop_reference must be at least 1"),
    (["--influence_timesteps_below", "0"], "leaves no timestep"),
    (["--influence_timesteps_below", "500", "--mode", "two-stage"], "exact-mode only"),
])
def test_bad_flags_are_refused_when_parsed(argv, message):
    with pytest.raises(InputError, match=message):
        parse_settings(InfluenceSettings, "", ["--task_json", "t"] + argv)


def test_defaults_are_the_papers():
    s = parse_settings(InfluenceSettings, "", ["--task_json", "t", "--device", "cpu"])
    assert (s.unlearning.unlearn_lr, s.unlearning.unlearn_steps, s.unlearning.unlearn_batch_size,
            s.unlearning.unlearn_grad_accum_steps, s.unlearning.fisher_dataset_size) == (0.1, 100, 16, 10, 400_000_000)
    assert (s.loss.loss_batch_size, s.loss.loss_time_samples, s.unlearning.weight_selection) == (200, 10,
                                                                                                 "cross-attn-kv")
    assert field_default(fields(CommonSettings)[4]) == 100_000  # laion_subset_size


def test_a_flag_whose_switch_is_off_is_named_in_a_warning(capsys):
    parse_settings(InfluenceSettings, "", ["--task_json", "t", "--device", "cpu", "--keep_top", "10"])
    assert "warning: --keep_top does nothing in this configuration" in capsys.readouterr().err
    parse_settings(InfluenceSettings, "", ["--task_json", "t", "--device", "cpu", "--mode", "two-stage",
                                           "--keep_top", "10", "--keep_margin", "3"])
    assert "warning" not in capsys.readouterr().err  # both act


def test_an_interrupt_ends_with_one_line_and_exit_130(capsys):
    from utils.cli import run

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as e:
        run(interrupted)
    assert e.value.code == 130
    assert capsys.readouterr().err.startswith("interrupted: what was finished is on disk")
