"""Every numeric field of every shipped config has a validated range, checked before any model loads.

Table-driven over the configs themselves: a new numeric field without a range fails here, and for every field a
value just outside its range (and NaN) is refused on the command line with exit status 2 naming the field.
"""

from __future__ import annotations

import importlib
import math

import pytest

from edu_prm_jax import cli, config_utils
from edu_prm_jax.commands.registry import COMMANDS
from edu_prm_jax.configs.ranges import Range, range_of


def numeric_fields():
    for name in COMMANDS:
        config = importlib.import_module(f"edu_prm_jax.configs.{name.replace('-', '_')}").get_config()
        for dotted, value in config_utils.iter_leaves(config):
            if isinstance(value, int | float) and not isinstance(value, bool):
                yield name, dotted, value


FIELDS = list(numeric_fields())


def outside(valid: Range, value: float) -> float:
    """A value just outside `valid` (below its low end, else above its high end)."""
    if valid.low is not None:
        return valid.low if valid.low_open else valid.low - 1
    if valid.high is not None:
        return valid.high if valid.high_open else valid.high + 1
    return math.nan


def test_every_numeric_field_has_a_range_that_holds_its_default():
    assert len(FIELDS) > 60
    missing = sorted({f"{name}: {dotted}" for name, dotted, _ in FIELDS if range_of(dotted) is None})
    assert not missing, f"numeric config fields without a range in configs/ranges.py: {missing}"
    for name, dotted, value in FIELDS:
        assert range_of(dotted).contains(value), (name, dotted, value)


@pytest.mark.parametrize("name,dotted,value", FIELDS, ids=[f"{n}:{d}" for n, d, _ in FIELDS])
def test_out_of_range_and_nan_are_refused_naming_the_field(name, dotted, value, tmp_path, capsys):
    valid = range_of(dotted)
    for bad in {outside(valid, value), math.nan}:
        text = repr(int(bad)) if isinstance(value, int) and math.isfinite(bad) else repr(float(bad))
        if isinstance(value, int) and not math.isfinite(bad):
            continue  # an int field cannot hold NaN: the flag parser refuses it already
        rc = cli.main([name, f"--workdir={tmp_path}", f"--config.{dotted}={text}"])
        err = capsys.readouterr().err
        assert rc == 2, (name, dotted, bad, err)
        assert f"config.{dotted}=" in err, err
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_hand_worked_ranges():
    assert Range(0, 1).contains(0) and Range(0, 1).contains(1) and not Range(0, 1).contains(1.5)
    assert not Range(0, low_open=True).contains(0.0) and Range(0, low_open=True).contains(1e-9)
    assert Range(1, also=(-1,)).contains(-1) and not Range(1, also=(-1,)).contains(0)
    assert not Range().contains(math.nan) and not Range().contains(math.inf)
    assert Range(0, 1, high_open=True).describe() == ">= 0 and < 1"


@pytest.mark.parametrize("name,dotted,value", FIELDS[::7], ids=[f"{n}:{d}" for n, d, _ in FIELDS[::7]])
def test_a_value_of_the_wrong_type_is_refused_naming_the_field(name, dotted, value, tmp_path, capsys):
    rc = cli.main([name, f"--workdir={tmp_path}", f"--config.{dotted}=abc"])
    err = capsys.readouterr().err
    assert rc == 2 and f"config.{dotted}" in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())
