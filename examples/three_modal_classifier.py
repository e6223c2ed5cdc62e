"""Three-modality concatenation-fusion classifier on mmkernels.nn.FusedConcatLinear.

Three image-like modalities (1, 3 and 4 channels, 28x28) go through small convolutional encoders;
their flattened features are fused by FusedConcatLinear(256, relu) (no torch.cat in forward or
backward) and classified by a 10-way head.

The generated data set splits the label between the modalities, so that only their fusion can
solve it: modality "gray" (1 channel) shows y // 2, "rgb" (3 channels) shows y % 5, and "rgbd"
(4 channels) shows y // 5, each as a noisy class pattern. Any two of them determine y, but one
alone leaves 2, 2 and 5 candidates: single-modality models top out at 50%, 50% and 20%.

The script trains the fused model and one model per modality, prints held-out accuracies, checks
that the fused model equals a reference model (same weights, torch.cat + nn.Linear) in outputs and
gradients, and times a training step of both.

    python examples/three_modal_classifier.py            # about a minute on 2 cores
    python examples/three_modal_classifier.py --quick    # smoke run, a few seconds
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from mmkernels.nn import FusedConcatLinear

MODALITIES = {"gray": 1, "rgb": 3, "rgbd": 4}  # name -> channels
# Which part of the label each modality shows (and how many distinct patterns that takes).
LABEL_PART = {"gray": (lambda y: y // 2, 5), "rgb": (lambda y: y % 5, 5), "rgbd": (lambda y: y // 5, 2)}
WIDTH = {"gray": 8, "rgb": 12, "rgbd": 16}  # encoder channels; features = width * 7 * 7
NUM_CLASSES, FUSED = 10, 256


# --------------------------------------------------------------------------- data


def make_dataset(n: int, noise: float, generator: torch.Generator, patterns=None):
    """n samples: {modality: (n, C, 28, 28)} and labels (n,). `patterns` are shared by train and test."""
    if patterns is None:
        # Smooth class patterns: random 7x7 grids per channel, upsampled to 28x28, unit variance.
        patterns = {}
        for name, channels in MODALITIES.items():
            groups = LABEL_PART[name][1]
            low = torch.randn(groups, channels, 7, 7, generator=generator)
            pat = F.interpolate(low, size=(28, 28), mode="bilinear", align_corners=False)
            patterns[name] = pat / pat.std(dim=(1, 2, 3), keepdim=True)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=generator)
    data = {}
    for name, channels in MODALITIES.items():
        part = LABEL_PART[name][0](y)
        scale = 0.5 + torch.rand(n, 1, 1, 1, generator=generator)  # contrast varies per sample
        data[name] = scale * patterns[name][part] + noise * torch.randn(n, channels, 28, 28, generator=generator)
    return data, y, patterns


# --------------------------------------------------------------------------- models


def encoder(channels: int, width: int) -> nn.Module:
    """28x28 -> (width, 7, 7) -> flattened features: a 4x4 patch embedding (cheap on the CPU, so the
    fusion layer is a fair share of the step and its speed shows)."""
    return nn.Sequential(nn.Conv2d(channels, width, 4, stride=4), nn.ReLU(), nn.Flatten())


class Classifier(nn.Module):
    """Encoders for the given modalities -> FusedConcatLinear(256, relu) -> 10-way head."""

    def __init__(self, modalities=tuple(MODALITIES)) -> None:
        super().__init__()
        self.modalities = tuple(sorted(modalities))  # the dict order FusedConcatLinear uses
        self.encoders = nn.ModuleDict({m: encoder(MODALITIES[m], WIDTH[m]) for m in self.modalities})
        self.fusion = FusedConcatLinear([WIDTH[m] * 49 for m in self.modalities], FUSED, activation="relu")
        self.head = nn.Linear(FUSED, NUM_CLASSES)

    def forward(self, inputs: dict) -> torch.Tensor:
        return self.head(self.fusion({m: self.encoders[m](inputs[m]) for m in self.modalities}))


class ReferenceFusion(nn.Module):
    """What the fused layer replaces: relu(nn.Linear(torch.cat(features, -1))), same parameter names."""

    def __init__(self, in_features, out_features) -> None:
        super().__init__()
        self.linear = nn.Linear(sum(in_features), out_features)

    def forward(self, features: dict) -> torch.Tensor:
        return F.relu(self.linear(torch.cat([features[k] for k in sorted(features)], dim=-1)))


def reference_model(fused: Classifier) -> Classifier:
    """A copy of `fused` whose fusion is torch.cat + nn.Linear, with the same weights."""
    ref = copy.deepcopy(fused)
    ref.fusion = ReferenceFusion(fused.fusion.in_features, FUSED)
    ref.fusion.linear.load_state_dict(fused.fusion.state_dict())  # same names: weight, bias
    return ref


# --------------------------------------------------------------------------- training


def batches(data, y, batch_size, generator):
    order = torch.randperm(len(y), generator=generator)
    for i in range(0, len(y), batch_size):
        idx = order[i : i + batch_size]
        yield {k: v[idx] for k, v in data.items()}, y[idx]


def train(model, data, y, epochs, batch_size, seed):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(epochs):
        for xb, yb in batches(data, y, batch_size, g):
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model


@torch.no_grad()
def accuracy(model, data, y, batch_size=512) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(y), batch_size):
        xb = {k: v[i : i + batch_size] for k, v in data.items()}
        correct += (model(xb).argmax(-1) == y[i : i + batch_size]).sum().item()
    return correct / len(y)


# --------------------------------------------------------------------------- checks and timing


def check_equal(fused, ref, data, rtol=1e-10):
    """Same outputs and same parameter gradients on one batch, relative to each tensor's scale.

    Gradients are taken for a random output gradient, not the loss: a trained, confident model has
    loss gradients so small that float32 rounding of the logits dominates them, in either model.
    Returns the largest relative differences (outputs, gradients).
    """
    # In float64, so that the comparison sees the fusion's arithmetic, not float32 rounding that a
    # ReLU can turn into a different gradient element.
    fused, ref = copy.deepcopy(fused).double(), copy.deepcopy(ref).double()
    xb = {k: v[:64].double() for k, v in data.items()}
    out_f, out_r = fused(xb), ref(xb)
    g = torch.randn_like(out_f)
    out_f.backward(g)
    out_r.backward(g)
    rel = lambda a, b: ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
    out_diff = rel(out_f.detach(), out_r.detach())
    params_r = dict(ref.named_parameters())
    grad_diff = 0.0
    for name, p in fused.named_parameters():
        q = params_r[name.replace("fusion.", "fusion.linear.")]
        grad_diff = max(grad_diff, rel(p.grad, q.grad))
    assert out_diff <= rtol and grad_diff <= rtol, f"fused vs reference: outputs {out_diff:.2e}, grads {grad_diff:.2e}"
    return out_diff, grad_diff


def step_times(models: dict, data, y, batch_size, repeats, warmup=3):
    """Median seconds of one training step (forward, backward, SGD update) per model, interleaved."""
    xb = {k: v[:batch_size] for k, v in data.items()}
    yb = y[:batch_size]
    opts = {name: torch.optim.SGD(m.parameters(), lr=1e-3) for name, m in models.items()}
    times = {name: [] for name in models}
    for i in range(warmup + repeats):
        for name, m in models.items():  # interleaved, so drifts of the machine hit both alike
            t0 = time.perf_counter()
            loss = F.cross_entropy(m(xb), yb)
            opts[name].zero_grad(set_to_none=True)
            loss.backward()
            opts[name].step()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small data and short training (smoke run)")
    parser.add_argument("--threads", type=int, default=2, help="threads for the timed training steps")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    # Training runs on one thread: with batches of 64 and layers this small, threads mostly wait on
    # each other, and on a busy machine OpenMP spinning makes a multi-threaded run many times slower.
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    n_train, n_test, epochs, repeats = (1500, 1000, 2, 10) if args.quick else (10000, 2000, 5, 50)
    batch_size, noise = 64, 6.0

    g = torch.Generator().manual_seed(args.seed)
    train_x, train_y, patterns = make_dataset(n_train, noise, g)
    test_x, test_y, _ = make_dataset(n_test, noise, g, patterns)

    t0 = time.perf_counter()
    results = {"accuracy": {}}
    fused = train(Classifier(), train_x, train_y, epochs, batch_size, args.seed)
    results["accuracy"]["fused"] = accuracy(fused, test_x, test_y)
    for m in MODALITIES:
        single = train(Classifier([m]), train_x, train_y, epochs, batch_size, args.seed)
        results["accuracy"][m] = accuracy(single, test_x, test_y)
    print(f"held-out accuracy ({n_train} train / {n_test} test, {epochs} epochs, {time.perf_counter() - t0:.1f}s):")
    for name, acc in results["accuracy"].items():
        print(f"  {name + (' only' if name != 'fused' else ' (gray+rgb+rgbd)'):>22}: {acc:6.1%}")

    ref = reference_model(fused)
    fused.train(), ref.train()
    results["max_diff"] = check_equal(fused, ref, test_x)
    print("fused model == reference model (torch.cat + nn.Linear): max relative difference of outputs %.1e, of gradients %.1e"
          % results["max_diff"])

    torch.set_num_threads(args.threads)
    times = step_times({"fused": fused, "reference": ref}, train_x, train_y, 256, repeats)
    results["step_ms"] = {k: v * 1e3 for k, v in times.items()}
    print(f"training step, batch 256, {args.threads} threads, median of {repeats}: fused "
          f"{times['fused'] * 1e3:.2f} ms, reference {times['reference'] * 1e3:.2f} ms "
          f"({times['reference'] / times['fused']:.2f}x)")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load > (os.cpu_count() or 1):
        print(f"  (load average {load:.1f} on {os.cpu_count()} cores: other processes share the CPUs, so these "
              "timings are noisy)")
    return results


if __name__ == "__main__":
    main()
