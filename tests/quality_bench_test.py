"""Tests of bench/quality.py's variant lists: each ablation step changes what it says."""
import os
import sys

import pytest

from estimator.config import Config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def quality():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import quality as bench
    finally:
        sys.path.pop(0)
    return bench


def _config(quality, spec: str) -> Config:
    return Config.from_dict(quality.variant_spec(spec)[1])


@pytest.mark.parametrize("base, steps", [("default", "_TWO_TOWER_STEPS"),
                                         ("default", "_OTHER_STEPS"),
                                         ("two_tower", "_DEFAULT_STEPS")])
def test_every_ablation_step_changes_its_base(quality, base, steps):
    # A step equal to its base (e.g. after a default moved) would train the base again
    # under another name.
    unchanged = [s for s in getattr(quality, steps)
                 if _config(quality, f"{base}+{s}") == _config(quality, base)]
    assert not unchanged


def test_two_tower_and_default_steps_move_to_the_other_side(quality):
    default, two_tower = _config(quality, "default"), _config(quality, "two_tower")
    for step in quality._DEFAULT_STEPS:
        moved = _config(quality, f"two_tower+{step}")
        for key in quality.parse_assignments(step.split("+")):
            assert getattr(moved, key) == getattr(default, key), (step, key)
    for step in quality._TWO_TOWER_STEPS:
        if step.startswith("dropout="):
            continue                    # dropout=0.1 is a probe beyond the two-tower's 0
        moved = _config(quality, f"default+{step}")
        for key in quality.parse_assignments(step.split("+")):
            assert getattr(moved, key) == getattr(two_tower, key), (step, key)
