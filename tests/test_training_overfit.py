"""Every stage's trainer overfits a fixed batch (its own file, so xdist runs it beside the other training tests)."""

import json

import pytest
from conftest import curated_one_clip

from show1.training.trainer import train


@pytest.fixture(scope="module")
def sr1_setup(tmp_path_factory):
    """sr1 at an eighth of the tiny sizes (16x10 → 64x40): it overfits as surely as at 128x80, in a quarter of the
    time (37 s instead of 137 s on one core); sr1 is the slowest stage to train."""
    return curated_one_clip(tmp_path_factory.mktemp("sr1"), {"curate": {"clip": {"sizes": [[16, 10], [64, 40]]}}})


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["base", "interp", "sr1", "sr2"])
def test_each_stage_overfits_a_fixed_batch(request, stage, tmp_path):
    folder, params = request.getfixturevalue("sr1_setup" if stage == "sr1" else "training_setup")
    # One clip: a batch of one sees the same data as a batch of two, at half the cost (sr1 dominates the suite).
    params = params.model_copy(update={"train": params.train.model_copy(update={"batch_size": 1})})
    result = train(stage, folder / "one-clip", tmp_path / "run", params, max_steps=25)
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < 0.5 * first, result.losses
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 26)) and all("loss" in r and "lr" in r for r in rows)
