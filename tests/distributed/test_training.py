"""Sequence-parallel training under standard engines (examples/sequence_parallel_training.py) on 2 gloo ranks:
the loss curve equals single-process training on the same data (float64)."""

import os
import sys

import pytest

from dilate_compiler.distributed.launch import free_port, run_ranks, values

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "examples"))
import sequence_parallel_training as example  # noqa: E402

STEPS = 6

pytestmark = pytest.mark.slow        # each engine trains on two processes


@pytest.fixture(scope="module")
def single_process_losses():
    losses = example.train_single(STEPS)
    assert losses[-1] != losses[0]
    return losses


@pytest.mark.parametrize("engine", ["ddp", "fsdp2", "lightning"])
def test_loss_curve_matches_single_process_training(engine, single_process_losses):
    if engine == "lightning":
        got = values(run_ranks(example.train_lightning_rank, 2, STEPS, free_port(), init=False))
    else:
        got = values(run_ranks(example.train_rank, 2, engine, STEPS))
    for losses in got:
        assert len(losses) == STEPS
        for a, b in zip(losses, single_process_losses):
            assert abs(a - b) <= 1e-9 * abs(b), (engine, losses, single_process_losses)
