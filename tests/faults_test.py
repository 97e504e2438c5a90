"""Fault injection: `mmrecall prep` SIGKILLed at random moments, then resumed, must give
the bytes of an uninterrupted run (shards, sidecars, rejects, vocabulary, word2vec vectors,
manifest) and leave no temporary file. Seeded; bench/faults.py runs longer campaigns."""
import os

import numpy as np
import pytest

from data_prep import prep
from mmrecall_testing import tsv_fixtures as fx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = 14


@pytest.fixture(scope="module")
def campaign(tmp_path_factory):
    """The inputs, an uninterrupted run's files and its wall time as a subprocess."""
    d = tmp_path_factory.mktemp("faults")
    inputs = fx.prep_inputs(str(d), SEED)
    seconds = fx.run_prep(fx.prep_argv(inputs, str(d / "reference")), REPO)
    return inputs, fx.comparable(fx.dir_files(str(d / "reference"))), seconds


# (workers, number of kills before the final run): one and two kills, one and two workers.
@pytest.mark.parametrize("case, workers, kills", [(0, "1", 2), (1, "2", 1), (2, "1", 1)])
def test_prep_killed_at_random_moments_resumes_to_identical_output(campaign, tmp_path, case,
                                                                   workers, kills):
    inputs, reference, seconds = campaign
    rng = np.random.default_rng([SEED, case])
    delays = rng.uniform(0.1, seconds, kills).tolist()
    out = str(tmp_path / "out")
    problems = fx.kill_and_resume(fx.prep_argv(inputs, out, "--workers", workers), out, delays,
                                  reference, REPO)
    assert problems == [], f"killed after {delays} s: {problems}"
    assert prep.main(["--verify", out]) == 0
