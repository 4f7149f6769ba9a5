"""Sequence-parallel training under standard engines (examples/sequence_parallel_training.py) on 2 gloo ranks:
the loss curve equals single-process training on the same data (float64), for a model written with the drop-in
module and for a transformers Llama rewritten by the compiler."""

import os
import sys

import pytest
import torch

from dilate_compiler.distributed.launch import free_port, run_ranks, values
from tests.tolerances import REL_ERR

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "examples"))
import sequence_parallel_training as example  # noqa: E402

STEPS = 6

pytestmark = pytest.mark.slow        # each engine trains on two processes


def _check(got, reference, what):
    assert reference[-1] != reference[0]
    for losses in got:
        assert len(losses) == STEPS
        for a, b in zip(losses, reference):
            assert abs(a - b) <= REL_ERR[torch.float64] * abs(b), (what, losses, reference)


@pytest.fixture(scope="module")
def single_process_losses():
    return example.train_single(STEPS)


@pytest.mark.parametrize("engine", ["ddp", "fsdp2", "lightning"])
def test_loss_curve_matches_single_process_training(engine, single_process_losses):
    if engine == "lightning":
        got = values(run_ranks(example.train_lightning_rank, 2, STEPS, free_port(), init=False))
    else:
        got = values(run_ranks(example.train_rank, 2, engine, STEPS))
    _check(got, single_process_losses, engine)


@pytest.fixture(scope="module")
def llama_single_process_losses():
    pytest.importorskip("transformers")
    return example.train_llama_single(STEPS)


@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_a_rewritten_llama_trains_as_in_one_process(engine, llama_single_process_losses):
    """The Llama's attention sites rewritten to sequence-parallel dilated attention (its causal mask and key padding
    read from the traced graph), wrapped by DDP or FSDP2 (``fully_shard``)."""
    got = values(run_ranks(example.train_llama_rank, 2, engine, STEPS))
    _check(got, llama_single_process_losses, engine)
