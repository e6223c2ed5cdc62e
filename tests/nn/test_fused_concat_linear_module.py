"""FusedConcatLinear against nn.Linear applied to torch.cat."""
import pytest
import torch
from torch import nn

from mmkernels.nn import FusedConcatLinear
from mmkernels.reference import ACTIVATIONS


def linear_and_fused(widths=(3, 5, 2), n=7, activation="relu", bias=True):
    linear = nn.Linear(sum(widths), n, bias=bias)
    fused = FusedConcatLinear(widths, n, bias=bias, activation=activation)
    fused.load_state_dict(linear.state_dict())
    return linear, fused


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("bias", [True, False])
def test_matches_linear_over_cat_outputs_and_gradients(activation, bias):
    linear, fused = linear_and_fused(activation=activation, bias=bias)
    xs = [torch.randn(4, 6, d, requires_grad=True) for d in (3, 5, 2)]
    expected = ACTIVATIONS[activation](linear(torch.cat(xs, -1)))
    got = fused(*xs)
    torch.testing.assert_close(got, expected)
    g = torch.randn_like(got)
    grads_e = torch.autograd.grad(expected, [*xs, *linear.parameters()], g)
    grads_f = torch.autograd.grad(got, [*xs, *fused.parameters()], g)
    for a, e in zip(grads_f, grads_e):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-4)


def test_state_dict_round_trip_both_ways():
    linear, fused = linear_and_fused()
    assert set(fused.state_dict()) == set(linear.state_dict()) == {"weight", "bias"}
    other = nn.Linear(10, 7)
    other.load_state_dict(fused.state_dict())
    torch.testing.assert_close(other.weight, fused.weight)


def test_forward_call_forms():
    _, fused = linear_and_fused(widths=(3, 5), n=4)
    a, b = torch.randn(2, 3), torch.randn(2, 5)
    expected = fused(a, b)
    torch.testing.assert_close(fused([a, b]), expected)
    torch.testing.assert_close(fused((a, b)), expected)
    # dicts are concatenated in sorted key order: "audio" < "vision"
    torch.testing.assert_close(fused({"vision": b, "audio": a}), expected)


def test_from_linear_shares_parameters():
    linear = nn.Linear(8, 3)
    fused = FusedConcatLinear.from_linear(linear, (5, 3), activation="gelu")
    assert fused.weight is linear.weight and fused.bias is linear.bias
    xs = [torch.randn(6, 5), torch.randn(6, 3)]
    torch.testing.assert_close(fused(*xs), torch.nn.functional.gelu(linear(torch.cat(xs, -1))))
    with pytest.raises(ValueError, match="in_features"):
        FusedConcatLinear.from_linear(linear, (5, 4))


def test_default_initialisation_has_linear_bounds():
    fused = FusedConcatLinear((30, 70), 50)
    bound = 1 / 100**0.5
    assert fused.weight.abs().max() <= bound and fused.bias.abs().max() <= bound
    assert fused.weight.std() > bound / 4  # not all zeros


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="in_features"):
        FusedConcatLinear((), 3)
    with pytest.raises(ValueError, match="activation"):
        FusedConcatLinear((2, 3), 3, activation="swish")
    _, fused = linear_and_fused(widths=(3, 5), n=4)
    with pytest.raises(ValueError, match="feature sizes"):
        fused(torch.randn(2, 3), torch.randn(2, 4))


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, (3e-2, 2e-2)), (torch.float16, (3e-3, 3e-3))], ids=str)
def test_half_precision_module_matches_linear(dtype, tol):
    # Against nn.Linear on the concatenation in the same dtype: output and every gradient.
    linear, fused = linear_and_fused()
    linear, fused = linear.to(dtype), fused.to(dtype)
    xs = [torch.randn(300, d, dtype=dtype, requires_grad=True) for d in (3, 5, 2)]
    expected = torch.relu(linear(torch.cat(xs, -1)))
    out = fused(*xs)
    torch.testing.assert_close(out, expected, atol=tol[0], rtol=tol[1])
    g = torch.randn_like(out) * ((expected > 0) & (out > 0))  # relu's mask may differ where rounding crosses 0
    ours = torch.autograd.grad(out, [*xs, fused.weight, fused.bias], g)
    theirs = torch.autograd.grad(expected, [*xs, linear.weight, linear.bias], g)
    for a, b in zip(ours, theirs):
        scale = max(b.abs().max().item(), 1.0)
        torch.testing.assert_close(a, b, atol=tol[0] * scale, rtol=tol[1])
