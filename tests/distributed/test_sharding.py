"""mmkernels ops on DTensors and the tensor-parallel styles, on 2 CPU processes (one spawn for the
module; see checks_sharding.py for what each check does)."""
import pytest
import torch.distributed as dist

from _spawn import assert_check, run_checks

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)

CHECKS = [
    "check_fused_concat_linear_batch_and_output_rows",
    "check_fused_concat_linear_input_columns",
    "check_low_rank_fusion_batch_and_output_columns",
    "check_attention_batch_and_heads",
    "check_attention_dropout_is_the_shards_own",
    "check_attention_rules_keep_query_groups_together",
    "check_varlen_attention_by_heads",
    "check_ops_reject_nothing_they_accept_replicated",
    "check_tp_cross_modal_attention_by_heads",
    "check_tp_fused_concat_linear_colwise_then_rowwise",
    "check_tp_cross_modal_attention_dropout_replays_under_checkpointing",
]


@pytest.fixture(scope="module")
def results():
    return run_checks("checks_sharding")


def test_every_check_is_listed(results):
    assert sorted(results) == sorted(CHECKS)


@pytest.mark.parametrize("name", CHECKS)
def test_check(results, name):
    assert_check(results, name)
