"""The fitting configs share one options dataclass, and the commands' option defaults are the configs' defaults."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given as hgiven, settings, strategies as st
from typer.main import get_command

from roadcascade.cli import app
from roadcascade.cli.defaults import default_of, given
from roadcascade.detect.config import DetTrainConfig, make_config
from roadcascade.fit.config import BuildConfig, DistillConfig, OptimOptions, RunOptions, TrainConfig
from roadcascade.fit.guard import GuardConfig
from roadcascade.io.synth.engine import SynthConfig
from roadcascade.models.export_config import ExportConfig

SHARED = [f.name for f in dataclasses.fields(RunOptions)]
CONFIGS = [TrainConfig, BuildConfig, DistillConfig, DetTrainConfig]


def make(config, **kw):
    return config(teacher="t", **kw) if config is DistillConfig else config(**kw)


def test_every_fitting_config_has_the_shared_options():
    for c in CONFIGS:
        assert issubclass(c, RunOptions)
        assert SHARED == [f.name for f in dataclasses.fields(c)][: len(SHARED)]
    assert all(issubclass(c, OptimOptions) for c in (TrainConfig, DistillConfig, DetTrainConfig))
    # the detector keeps its own defaults for the shared fields
    assert (DetTrainConfig().threads, DetTrainConfig().epochs, TrainConfig().threads, TrainConfig().epochs) == (1, 10, None, 8)


@settings(max_examples=25, deadline=None)
@hgiven(seed=st.integers(0, 2**31), device=st.sampled_from(["auto", "cpu", "cuda"]), data=st.none() | st.text(min_size=1, max_size=8),
        threads=st.none() | st.integers(1, 64), max_train=st.none() | st.integers(1, 10_000),
        max_steps=st.none() | st.integers(1, 10_000), config=st.sampled_from(CONFIGS))
def test_shared_options_pass_through_by_keyword(seed, device, data, threads, max_train, max_steps, config):
    kw = dict(seed=seed, device=device, data=data, threads=threads, max_train=max_train, max_steps=max_steps)
    cfg = make(config, **kw)
    assert cfg.run_options() == kw
    # handed on to another config (as build hands its options to the trainer of missing tiers)
    assert TrainConfig(**cfg.run_options(), model="lite0").run_options() == kw


def test_first_positional_fields_are_the_configs_own():
    assert TrainConfig("lite1").model == "lite1" and BuildConfig("a@64").tiers == "a@64"
    assert DistillConfig("teacher/dir").teacher == "teacher/dir" and DetTrainConfig("gpu").recipe == "gpu"
    with pytest.raises(TypeError):
        DistillConfig()  # the teacher is required
    assert make_config("gpu", epochs=3).epochs == 3 and make_config("gpu").threads is None


def test_default_of_and_given():
    assert default_of(TrainConfig, "lr") == 6e-4 and default_of(BuildConfig, "budget") == "35%"
    assert default_of(DetTrainConfig, "threads") == 1 and default_of(BuildConfig, "rules") == BuildConfig().rules
    for bad in (lambda: default_of(DistillConfig, "teacher"), lambda: default_of(TrainConfig, "nope"),
                lambda: default_of(dict, "x")):
        with pytest.raises(TypeError):
            bad()
    assert given(a=None, b=0, c=False, d="") == {"b": 0, "c": False, "d": ""}


# command -> (config, {option name: config field}); options named as a field read that field's default
COMMANDS = {
    ("train",): (TrainConfig, {}),
    ("build",): (BuildConfig, {"epochs": "train_epochs"}),
    ("distill",): (DistillConfig, {}),
    ("train-detector",): (DetTrainConfig, {"test": "evaluate_test"}),
    ("calibrate-detector",): (DetTrainConfig, {"test": "evaluate_test"}),
    ("guard",): (GuardConfig, {}),
    ("synth",): (SynthConfig, {}),
    ("export",): (ExportConfig, {}),
}


def _command(path):
    cmd = get_command(app)
    for name in path:
        cmd = cmd.commands[name]
    return cmd


@pytest.mark.parametrize("path", sorted(COMMANDS))
def test_command_defaults_are_the_config_defaults(path):
    config, rename = COMMANDS[path]
    names = {f.name for f in dataclasses.fields(config)}
    checked = 0
    for p in _command(path).params:
        field = rename.get(p.name, p.name)
        if field not in names or p.default is None:  # None: not given, the config's (or the recipe's) default applies
            continue
        want = default_of(config, field)
        if isinstance(want, tuple):
            want = ",".join(want) if isinstance(p.default, str) else list(want)
        assert (list(p.default) if isinstance(p.default, tuple) else p.default) == want, (path, p.name)
        checked += 1
    assert checked >= 2, path
