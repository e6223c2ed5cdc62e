"""fused_concat_linear against the reference (torch.cat + F.linear + activation)."""
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import TOLERANCES

import mmkernels
from mmkernels import _C, reference

ACTIVATIONS = ["none", "relu", "gelu", "gelu_tanh", "silu", "tanh", "sigmoid"]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
LOW_PRECISION = (torch.bfloat16, torch.float16)


def make_case(lead, widths, n, dtype, bias=True, requires_grad=True):
    xs = [torch.randn(*lead, d, dtype=dtype, requires_grad=requires_grad) for d in widths]
    w = (torch.randn(n, sum(widths), dtype=dtype) / sum(widths) ** 0.5).requires_grad_(requires_grad)
    b = torch.randn(n, dtype=dtype, requires_grad=requires_grad) if bias else None
    return xs, w, b


def reference_in(dtype_ref, xs, w, b, activation):
    """The reference evaluated on upcast copies of the inputs, so rounding is only ours."""
    up = lambda t: None if t is None else t.detach().to(dtype_ref).requires_grad_(t.requires_grad)
    xs_r, w_r, b_r = [up(x) for x in xs], up(w), up(b)
    return reference.fused_concat_linear(xs_r, w_r, b_r, activation), (xs_r, w_r, b_r)


def _relu_with_mask(xs, w, b, mask):
    """The float64 reference of relu(linear(cat)), with relu's 0/1 mask given."""
    z, leaves = reference_in(torch.float64, xs, w, b, "none")
    return z * mask.to(torch.float64), leaves


def assert_close(actual, expected, dtype):
    atol, rtol = TOLERANCES[dtype]
    # Absolute tolerance relative to the tensor's scale: gradients are sums over many rows.
    scale = expected.abs().max().item() if expected.numel() else 1.0
    torch.testing.assert_close(actual.to(expected.dtype), expected, atol=atol * max(scale, 1.0), rtol=rtol)


def op_direct(xs, w, b, activation):
    """The registered op itself (the wrapper sends few-row CPU calls to eager ATen)."""
    return torch.ops.mmkernels.fused_concat_linear(xs, w, b, activation)[0]


def check_against_reference(xs, w, b, activation, op=mmkernels.fused_concat_linear):
    dtype = w.dtype
    out = op(xs, w, b, activation)
    ref_dtype = torch.float64
    expected, (xs_r, w_r, b_r) = reference_in(ref_dtype, xs, w, b, activation)
    assert out.shape == expected.shape and out.dtype == dtype
    assert_close(out, expected, dtype)
    if dtype in LOW_PRECISION and activation == "relu":
        # Where the pre-activation is within bf16/fp16 rounding of 0, relu's mask may legitimately differ
        # from the float64 one; take the mask from our output so the gradient check stays exact.
        expected, (xs_r, w_r, b_r) = _relu_with_mask(xs, w, b, out > 0)
    grad = torch.randn_like(out)
    params = [*xs, w] + ([b] if b is not None else [])
    params_r = [*xs_r, w_r] + ([b_r] if b_r is not None else [])
    grads = torch.autograd.grad(out, params, grad)
    grads_r = torch.autograd.grad(expected, params_r, grad.to(ref_dtype))
    for g, g_r in zip(grads, grads_r):
        assert g.shape == g_r.shape and g.dtype == dtype
        assert_close(g, g_r, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_matches_reference_each_activation_and_dtype(dtype, activation):
    xs, w, b = make_case((5, 7), (3, 17, 1), 13, dtype)
    check_against_reference(xs, w, b, activation)


@pytest.mark.parametrize(
    "lead,widths,n",
    [((1,), (1,), 1), ((3,), (17, 123), 3), ((123,), (3, 1, 17), 17), ((2, 3, 4), (5, 6), 7), ((), (9, 4), 5),
     ((4100,), (33, 65), 129)],  # the last one spans several row blocks
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_odd_shapes_and_leading_dims(lead, widths, n, dtype):
    xs, w, b = make_case(lead, widths, n, dtype)
    check_against_reference(xs, w, b, "relu")


@pytest.mark.parametrize("onednn", [True, False])
@pytest.mark.parametrize("activation", ["relu", "gelu", "none"])
def test_large_weight_with_and_without_onednn(onednn, activation):
    # N * K > 2^18: where float32 GEMMs go to oneDNN (csrc/cpu/matmul.cpp) the forward runs one
    # whole-M GEMM per segment, with oneDNN disabled row blocks on ATen's mm; backward forms gz in
    # full either way. The second input is column-major, the third strided both ways (ATen's path).
    xs, w, b = make_case((70,), (300, 333, 40), 400, torch.float32)
    xs[1] = torch.randn(333, 70).t().requires_grad_()
    xs[2] = torch.randn(70, 80)[:, ::2].requires_grad_()
    with warnings.catch_warnings(), torch.backends.mkldnn.flags(enabled=onednn):
        warnings.simplefilter("ignore")  # the flags context warns about TF32 on Intel GPUs
        if not onednn:
            assert _C.cpu_float32_gemm() == "ATen mm (MKL)"
        check_against_reference(xs, w, b, activation)


@pytest.mark.parametrize("segments", [1, 2, 5, 16])
def test_segment_counts(segments):
    xs, w, b = make_case((37,), [3 + 2 * i for i in range(segments)], 11, torch.float32)
    check_against_reference(xs, w, b, "gelu")


def test_without_bias():
    xs, w, _ = make_case((19,), (4, 8), 6, torch.float32)
    check_against_reference(xs, w, None, "silu")


def test_non_contiguous_inputs_and_weight():
    base = [torch.randn(8, 6, 2 * d) for d in (5, 9)]
    xs = [t[..., ::2].transpose(0, 1).requires_grad_() for t in base]  # strided and transposed
    w = torch.randn(14, 7).t().requires_grad_()  # (7, 14), column-major
    b = torch.randn(14)[::2].detach().requires_grad_()  # stride 2
    assert not xs[0].is_contiguous() and not w.is_contiguous() and not b.is_contiguous()
    check_against_reference(xs, w, b, "tanh")


def test_empty_batch():
    xs, w, b = make_case((0,), (3, 4), 5, torch.float32)
    out = mmkernels.fused_concat_linear(xs, w, b, "relu")
    assert out.shape == (0, 5)
    out.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))
    assert xs[0].grad.shape == (0, 3)


def test_only_some_inputs_need_grad():
    xs, w, b = make_case((6,), (3, 4), 5, torch.float64)
    xs[0].requires_grad_(False)
    w.requires_grad_(False)
    out = mmkernels.fused_concat_linear(xs, w, b, "sigmoid")
    expected = reference.fused_concat_linear(xs, w, b, "sigmoid")
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [xs[1], b], g)
    want = torch.autograd.grad(expected, [xs[1], b], g)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)


def test_never_materialises_the_concatenation():
    xs, w, b = make_case((64,), (8, 16, 4), 10, torch.float32)
    with torch.profiler.profile() as prof:
        mmkernels.fused_concat_linear(xs, w, b, "relu").sum().backward()
    names = {e.name for e in prof.events()}
    assert "mmkernels::fused_concat_linear" in names
    assert not {"aten::cat", "aten::split", "aten::split_with_sizes"} & names


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradcheck(activation):
    xs, w, b = make_case((3, 2), (2, 3, 1), 4, torch.float64)
    fn = lambda x0, x1, x2, w_, b_: mmkernels.fused_concat_linear([x0, x1, x2], w_, b_, activation)
    assert torch.autograd.gradcheck(fn, (*xs, w, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("activation", ["none", "gelu"])
def test_opcheck(activation, dtype):
    xs, w, b = make_case((4, 3), (5, 2), 6, dtype)
    torch.library.opcheck(torch.ops.mmkernels.fused_concat_linear.default, (xs, w, b, activation))
    torch.library.opcheck(torch.ops.mmkernels.fused_concat_linear.default, (xs, w, None, activation))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_opcheck_backward_op(dtype):
    xs, w, b = make_case((4,), (5, 2), 6, dtype, requires_grad=False)
    out, pre = torch.ops.mmkernels.fused_concat_linear(xs, w, b, "silu")
    args = (torch.randn_like(out), xs, w, out, pre, "silu", [True, False], True, True)
    torch.library.opcheck(torch.ops.mmkernels.fused_concat_linear_backward.default, args)


def test_torch_compile_fullgraph_forward_and_backward():
    xs, w, b = make_case((16,), (8, 4), 6, torch.float32)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(x0, x1, w_, b_):
        return mmkernels.fused_concat_linear([x0, x1], w_, b_, "gelu").square().sum()

    loss = step(*xs, w, b)
    loss.backward()
    expected = reference.fused_concat_linear(
        [x.detach() for x in xs], w.detach(), b.detach(), "gelu"
    ).square().sum()
    torch.testing.assert_close(loss, expected, atol=1e-4, rtol=1e-4)
    assert w.grad is not None and xs[0].grad is not None


def test_torch_compile_inductor():
    xs, w, b = make_case((16,), (8, 4), 6, torch.float32, requires_grad=False)
    fn = torch.compile(lambda x0, x1: mmkernels.fused_concat_linear([x0, x1], w, b, "relu") * 2, fullgraph=True)
    torch.testing.assert_close(fn(*xs), 2 * reference.fused_concat_linear(xs, w, b, "relu"))


def test_torch_export():
    module = mmkernels.nn.FusedConcatLinear((4, 6), 5, activation="relu")
    args = (torch.randn(3, 4), torch.randn(3, 6))
    exported = torch.export.export(module, args)
    assert any("mmkernels.fused_concat_linear" in str(n.target) for n in exported.graph.nodes)
    torch.testing.assert_close(exported.module()(*args), module(*args))


@pytest.mark.parametrize(
    "make_args,match",
    [
        (lambda xs, w, b: ([], w, b, "relu"), "inputs"),
        (lambda xs, w, b: ([xs[0], xs[1][:2]], w, b, "relu"), r"inputs\[1\]"),
        (lambda xs, w, b: (xs, w[:, :-1], b, "relu"), "weight"),
        (lambda xs, w, b: (xs, w[0], b, "relu"), "weight"),
        (lambda xs, w, b: (xs, w, b[:-1], "relu"), "bias"),
        (lambda xs, w, b: ([xs[0], xs[1].double()], w, b, "relu"), r"inputs\[1\]"),
        (lambda xs, w, b: (xs, w, b.double(), "relu"), "bias"),
        (lambda xs, w, b: ([xs[0], xs[1].to("meta")], w, b, "relu"), r"inputs\[1\]"),
        (lambda xs, w, b: (xs, w, b, "swish"), "activation"),
        (lambda xs, w, b: ([xs[0], torch.tensor(1.0)], w, b, "relu"), r"inputs\[1\]"),
    ],
)
def test_bad_input_names_the_argument(make_args, match):
    xs, w, b = make_case((4,), (3, 2), 5, torch.float32, requires_grad=False)
    with pytest.raises(ValueError, match=match):
        mmkernels.fused_concat_linear(*make_args(xs, w, b))


def test_bad_input_through_the_raw_op_is_a_runtime_error():
    xs, w, b = make_case((4,), (3, 2), 5, torch.float32, requires_grad=False)
    with pytest.raises(RuntimeError, match="argument 'weight'"):
        torch.ops.mmkernels.fused_concat_linear(xs, w[:, :-1], b, "relu")
    with pytest.raises(RuntimeError, match="argument 'activation'"):
        torch.ops.mmkernels.fused_concat_linear(xs, w, b, "swish")
    with pytest.raises(RuntimeError, match=r"argument 'inputs\[1\]'"):
        torch.ops.mmkernels.fused_concat_linear([xs[0], xs[1][:3]], w, b, "relu")


def test_deterministic_and_thread_count_independent():
    xs, w, b = make_case((3000,), (40, 24), 48, torch.float32, requires_grad=False)
    first = mmkernels.fused_concat_linear(xs, w, b, "gelu")
    assert torch.equal(first, mmkernels.fused_concat_linear(xs, w, b, "gelu"))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = mmkernels.fused_concat_linear(xs, w, b, "gelu")
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(single, first, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("activation", ["relu", "gelu", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_few_rows(activation, dtype):
    # M * 8 <= N: the kernel concatenates (concat_is_cheaper); the wrapper takes eager ATen there.
    xs, w, b = make_case((2, 3), (40, 1, 23), 64, dtype)
    check_against_reference(xs, w, b, activation, op=op_direct)
    check_against_reference(xs, w, b, activation)
    # The wrapper's route: float32's few rows (6 here) go to the op's small-GEMM kernel through one C++
    # autograd node; the other dtypes to PyTorch's own autograd graph.
    name = mmkernels.fused_concat_linear(xs, w, b, activation).grad_fn.name()
    assert ("ConcatLinearFunction" in name) == (dtype == torch.float32), name
    assert "FusedConcatLinear" not in name


@pytest.mark.parametrize("lead,n", [((2, 3), 40), ((50,), 6)])
def test_eager_route_matches_the_registered_autograd(lead, n):
    # mmkernels.fused_concat_linear takes a direct autograd.Function in plain eager; torch.ops callers,
    # torch.compile and export get the register_autograd formula. Both must give the same numbers.
    xs, w, b = make_case(lead, (7, 12), n, torch.float32)
    xs[1].requires_grad_(False)
    g = torch.randn(*lead, n)
    for activation in ("relu", "silu"):
        direct = mmkernels.fused_concat_linear(xs, w, b, activation)
        # Up to 32 rows the C++ node (csrc/small_calls.cpp), else the Python autograd.Function.
        node = "ConcatLinearFunction" if math.prod(lead) <= 32 else "_FusedConcatLinearEagerBackward"
        assert node in direct.grad_fn.name()
        registered, _ = torch.ops.mmkernels.fused_concat_linear(xs, w, b, activation)
        assert torch.equal(direct, registered)
        for a, e in zip(torch.autograd.grad(direct, [xs[0], w, b], g), torch.autograd.grad(registered, [xs[0], w, b], g)):
            assert torch.equal(a, e)


def test_no_grad_call_records_no_graph():
    xs, w, b = make_case((4,), (3, 2), 5, torch.float32)
    with torch.no_grad():
        assert mmkernels.fused_concat_linear(xs, w, b, "relu").grad_fn is None
    xs, w, b = make_case((4,), (3, 2), 5, torch.float32, requires_grad=False)
    assert mmkernels.fused_concat_linear(xs, w, b, "relu").grad_fn is None


def test_few_rows_non_contiguous_and_empty_segment():
    base = [torch.randn(3, 2 * d) for d in (20, 0, 9)]
    xs = [t[:, ::2].requires_grad_() for t in base]  # rows not contiguous: the cat/copy_ fallback
    w = (torch.randn(48, 29) / 29 ** 0.5).requires_grad_()
    b = torch.randn(48, requires_grad=True)
    check_against_reference(xs, w, b, "relu", op=op_direct)
    xs = [torch.randn(3, d, requires_grad=True) for d in (20, 0, 9)]  # contiguous, one empty segment
    check_against_reference(xs, w, b, "gelu", op=op_direct)


def test_default_gemm_size_rule_matches_reference():
    """The tests run every GEMM through oneDNN (conftest sets MMKERNELS_ONEDNN_MIN_MACS=0); by default the
    small ones go to ATen's mm (csrc/cpu/matmul.cpp). Check that default in a fresh process, on GEMMs
    on both sides of the size rule, forward and backward, in every branch (row blocks, whole-M)."""
    code = """
import torch, mmkernels
from mmkernels import reference
torch.manual_seed(0)
for M, widths, N, act in [(3, (5, 7), 4, "gelu"), (8, (64, 64, 64), 64, "relu"), (300, (256, 128), 300, "none"),
                          (260, (300, 333), 400, "silu")]:
    xs = [torch.randn(M, d, requires_grad=True) for d in widths]
    w = (torch.randn(N, sum(widths)) / sum(widths) ** 0.5).requires_grad_()
    b = torch.randn(N, requires_grad=True)
    g = torch.randn(M, N)
    out, _ = torch.ops.mmkernels.fused_concat_linear(xs, w, b, act)
    got = torch.autograd.grad(out, [*xs, w, b], g)
    ref = reference.fused_concat_linear(xs, w, b, act)
    expected = torch.autograd.grad(ref, [*xs, w, b], g)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=2e-4)
    public = mmkernels.fused_concat_linear(xs, w, b, act)  # the documented rule: up to 32 rows the op's C++
    # node, other small ones cat + F.linear, the rest the op's Python autograd.Function
    node = public.grad_fn.name()
    assert ("ConcatLinearFunction" in node) == (M <= 32)
    assert (node == "_FusedConcatLinearEagerBackward") == (M * sum(widths) * N >= 1 << 24)
    torch.testing.assert_close(public, ref, rtol=1e-4, atol=1e-4)
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "MMKERNELS_ONEDNN_MIN_MACS"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
