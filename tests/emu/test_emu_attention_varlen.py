"""The tensor-core attention kernels on packed variable-length sequences (AttnParams::cu_seqlens_q /
_k: the layout of cross_modal_attention_varlen on CUDA), run from their own source on the emulation
harness, forward and backward, against mmkernels/reference.py in float64: empty and length-1
sequences, partial and many tiles, both causal alignments, grouped-query heads (H_kv in {1, 2, H}),
row strides other than H * E, and dropout keeping exactly the elements the CPU kernel keeps.
Tolerances: those of the dense emulator tests (attention_emu.TOL)."""
from __future__ import annotations

import pytest
import torch

from attention_emu import DTYPES, HEAD_DIMS, VarlenProblem
from harness import harness
from varlen_emu import run_varlen_case
from varlen_support import cpu_keep_masks, prefix_sums

pytestmark = pytest.mark.emu

# Sequence lengths (queries, keys): an empty query sequence with keys (zero dK / dV), queries with no
# key (zeros, lse = +inf, zero gradient), length 1 on either side, partial tiles, several tiles.
LENS_Q = [0, 5, 1, 70, 3, 130]
LENS_K = [3, 0, 1, 83, 150, 64]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("E", HEAD_DIMS)
def test_varlen_forward_and_backward(E, dtype):
    run_varlen_case(LENS_Q, LENS_K, 2, E, dtype, gen_seed=E)


@pytest.mark.parametrize("causal", [1, 2])
@pytest.mark.parametrize("E", HEAD_DIMS)
def test_varlen_causal_both_alignments(causal, E):
    # Lq < Lk, Lq > Lk (lower-right leaves the first Lq - Lk rows seeing nothing) and Lq = Lk, per sequence.
    run_varlen_case([70, 150, 1, 90, 37], [150, 37, 90, 1, 37], 2, E, torch.float16 if E != 64 else torch.bfloat16,
                    causal=causal, gen_seed=causal)


@pytest.mark.parametrize("H_kv", [1, 2, 4])
def test_varlen_grouped_query_heads(H_kv):
    run_varlen_case([45, 1, 70], [83, 17, 0], 4, 64, torch.float16, H_kv=H_kv, causal=1 if H_kv == 2 else 0)
    run_varlen_case([33, 65], [64, 130], 4, 32, torch.bfloat16, H_kv=H_kv, causal=2, gen_seed=1)


def test_varlen_long_sequences():
    # Several key tiles and query tiles per sequence, beside a length-1 one and a 200-row one.
    run_varlen_case([300, 1, 200], [420, 1, 64], 2, 64, torch.bfloat16, causal=2)


@pytest.mark.parametrize("E", [32, 128])
def test_varlen_row_strides_of_a_projection(E):
    # q, k, v as head slices of fused projections: row strides (H + 1) E and (2 H_kv + 1) E.
    run_varlen_case([40, 1, 77], [90, 5, 64], 2, E, torch.float16, layout="projection", causal=1, gen_seed=3)


@pytest.mark.parametrize("H_kv", [1, 3])
def test_varlen_dropout_keeps_the_cpu_kernels_elements(H_kv):
    # q = k = 0 and one-hot values: an output element is positive iff dropout kept it, so the kernels'
    # keep mask is read off and compared with the CPU varlen kernel's, element for element.
    lens_q, lens_k, H, p, seed = [17, 0, 40, 1, 64], [64, 9, 33, 1, 2], 3, 0.4, 4321
    cu_q, cu_k = prefix_sums(lens_q), prefix_sums(lens_k)
    q = torch.zeros(sum(lens_q), H, 64, dtype=torch.float16)
    k = torch.zeros(sum(lens_k), H_kv, 64, dtype=torch.float16)
    v = torch.zeros(sum(lens_k), H_kv, 64, dtype=torch.float16)
    for k0, n in zip(cu_k.tolist(), lens_k):
        v[k0:k0 + n, :, :n] = torch.eye(n).unsqueeze(1)
    out, _ = VarlenProblem(harness(), q, k, v, cu_q, cu_k, 1.0, p, seed).forward()
    want = cpu_keep_masks(H, H_kv, cu_q, cu_k, p, seed)
    kept = 0
    for b, q0 in enumerate(cu_q.tolist()[:-1]):
        got = (out[q0:q0 + lens_q[b], :, :lens_k[b]] > 0).transpose(0, 1).unsqueeze(0)
        assert torch.equal(got, want[b]), f"sequence {b}: the kernels keep other elements than the CPU kernel"
        kept += got.sum().item()
    total = sum(a * b for a, b in zip(lens_q, lens_k)) * H
    assert 0.45 < kept / total < 0.75  # a keep rate near 1 - p


@pytest.mark.parametrize("causal", [0, 2])
def test_varlen_dropout_forward_and_backward(causal):
    # The same keep mask in backward (regenerated from the seed) as in forward, against the reference.
    run_varlen_case([33, 1, 70], [90, 17, 64], 2, 64, torch.float16, H_kv=1, causal=causal, dropout_p=0.3, seed=99)


def test_varlen_tiles_past_a_sequence_write_nothing_of_the_next():
    # Sequences shorter than a tile packed back to back: every block of the longest sequence's grid
    # runs for each sequence, and the bounds / race checks see any write outside a sequence's rows.
    run_varlen_case([3] * 9 + [130], [5] * 9 + [70], 2, 32, torch.float16, causal=1, gen_seed=5)
