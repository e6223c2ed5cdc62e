"""Data-parallel training (DDP, FSDP2), distributed state_dict, activation checkpointing and
torch.compile with mmkernels models, on 2 CPU processes (one spawn for the module; see
checks_training.py for what each check does)."""
import pytest
import torch.distributed as dist

from _spawn import assert_check, run_checks

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)

CHECKS = [
    "check_ddp_step_equals_one_process",
    "check_ddp_optimizer_steps_keep_ranks_identical",
    "check_fsdp2_step_equals_one_process",
    "check_fsdp2_distributed_state_dict_round_trip",
    "check_checkpointing_with_dropout_is_exact",
    "check_checkpointing_inside_fsdp2_is_exact",
    "check_compile_of_ddp_converted_decoder",
]


@pytest.fixture(scope="module")
def results():
    return run_checks("checks_training")


def test_every_check_is_listed(results):
    assert sorted(results) == sorted(CHECKS)


@pytest.mark.parametrize("name", CHECKS)
def test_check(results, name):
    assert_check(results, name)
