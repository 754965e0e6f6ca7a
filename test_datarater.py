"""Tests: numeric checks against independent references (finite differences, a replay of the
inner updates), and end-to-end runs of the CLI on tiny budgets.

    python -m pytest -q test_datarater.py

Tests that need MNIST look in $DATARATER_DATA, then ../shared/data, then ./data, and skip
with a reason when none holds it.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import datarater as D

HERE = Path(__file__).resolve().parent


def find_mnist():
    for root in (os.environ.get("DATARATER_DATA"), HERE.parent / "shared" / "data", HERE / "data"):
        if root and (Path(root) / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
            return str(root)
    return None


MNIST = find_mnist()
needs_mnist = pytest.mark.skipif(MNIST is None, reason="MNIST raw files not found in $DATARATER_DATA, "
                                 "../shared/data or ./data")


def cfg_for(*argv):
    return D.parse_args(["--device", "cpu", *argv])


def tiny_setup(cfg, dtype=torch.float64, seed=0, B=4):
    """A rater, a population and one batch of synthetic MNIST-shaped data, in float64."""
    torch.manual_seed(seed)
    N, T = cfg.num_inner_models, cfg.inner_steps
    rater = D.DataRater().to(dtype)
    model = D.ToyCNN().to(dtype)
    pop = D.Population(model, cfg, torch.device("cpu"), dtype)
    batch = {"xs": torch.rand(N, T, B, 1, 28, 28, dtype=dtype) * 2 - 1, "ys": torch.randint(0, 10, (N, T, B)),
             "x_val": torch.rand(N, B, 1, 28, 28, dtype=dtype) * 2 - 1, "y_val": torch.randint(0, 10, (N, B))}
    return rater, model, pop, batch


def outer_loss_at(rater, model, pop, batch, cfg, eta):
    return D.outer_loss(rater, eta, model, pop, batch, cfg)[0].item()


# ----------------------------------------------------------------------------------------------
# The meta-gradient against central finite differences (float64)
# ----------------------------------------------------------------------------------------------

# Small steps keep every ReLU / max-pool decision fixed within +-h, so that the outer loss is
# smooth where the difference is taken (large steps cross kinks and the check measures those).
@pytest.mark.parametrize("opt,lr", [("sgd", 0.05), ("adam", 0.002)])
def test_meta_gradient_matches_finite_differences(opt, lr):
    cfg = cfg_for("--inner-optimizer", opt, "--inner-lr", str(lr), "--num-inner-models", "2",
                  "--inner-steps", "2", "--temperature", "0.5")
    rater, model, pop, batch = tiny_setup(cfg)
    # Give the Adam state some history first (a fresh Adam step is sign(g): flat in the weights).
    warm = torch.optim.SGD(rater.parameters(), lr=0.0)
    for _ in range(2):
        D.meta_step(rater, warm, model, pop, tiny_setup(cfg, seed=1)[3], cfg)
    with torch.no_grad():  # spread the scores so the weights are far from uniform
        rater.head.weight.mul_(3)
    _, grads, _, _ = D.meta_gradient(rater, model, pop, batch, cfg)
    eta = {k: v.detach().clone() for k, v in rater.named_parameters()}
    names = list(eta)
    gen = torch.Generator().manual_seed(0)
    h = 1e-6
    checks = []
    for _ in range(3):  # random directions through all of eta
        d = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in eta.items()}
        plus = outer_loss_at(rater, model, pop, batch, cfg, {k: eta[k] + h * d[k] for k in names})
        minus = outer_loss_at(rater, model, pop, batch, cfg, {k: eta[k] - h * d[k] for k in names})
        fd = (plus - minus) / (2 * h)
        an = sum((g * d[k]).sum().item() for g, k in zip(grads, names))
        checks.append((an, fd))
    for k, g in zip(names, grads):  # the largest coordinate of each parameter tensor
        if k == "head.bias":  # softmax ignores a shift of all scores: no gradient at all
            assert g.abs().max() < 1e-10
            continue
        i = g.abs().flatten().argmax().item()
        e = torch.zeros_like(eta[k]).flatten()
        e[i] = 1.0
        e = e.view_as(eta[k])
        plus = outer_loss_at(rater, model, pop, batch, cfg, {**eta, k: eta[k] + h * e})
        minus = outer_loss_at(rater, model, pop, batch, cfg, {**eta, k: eta[k] - h * e})
        checks.append((g.flatten()[i].item(), (plus - minus) / (2 * h)))
    for an, fd in checks:
        assert abs(fd) > 1e-8, "finite difference too small to compare: the test set-up is degenerate"
        assert abs(an - fd) / abs(fd) < 1e-4, (an, fd)


def test_vmapped_population_equals_loop():
    for opt in ("sgd", "adam"):
        loop = cfg_for("--inner-optimizer", opt, "--num-inner-models", "3", "--inner-lr", "0.05")
        vec = cfg_for("--inner-optimizer", opt, "--num-inner-models", "3", "--inner-lr", "0.05",
                      "--vectorize-population")
        rater, model, pop, batch = tiny_setup(loop, B=8)
        l1, g1, th1, o1 = D.meta_gradient(rater, model, pop, batch, loop)
        l2, g2, th2, o2 = D.meta_gradient(rater, model, pop, batch, vec)
        assert torch.allclose(l1, l2, rtol=1e-10, atol=1e-12)
        for a, b in zip(g1, g2):
            assert torch.allclose(a, b, rtol=1e-8, atol=1e-12)
        for k in th1:
            assert torch.allclose(th1[k], th2[k], rtol=1e-10, atol=1e-12)


def test_adam_meta_gradient_stays_finite_with_dead_units():
    # Units whose gradient is exactly 0 have v = 0; d sqrt(v)/dv there would be infinite.
    cfg = cfg_for("--inner-optimizer", "adam", "--num-inner-models", "2")
    rater, model, pop, batch = tiny_setup(cfg, dtype=torch.float32)
    pop.theta["layers.7.weight"][0, :10] = 0.0
    pop.theta["layers.7.bias"][0, :10] = -100.0  # 10 dead hidden units in model 0
    _, grads, _, _ = D.meta_gradient(rater, model, pop, batch, cfg)
    assert all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


# ----------------------------------------------------------------------------------------------
# Corruption
# ----------------------------------------------------------------------------------------------

def test_pixel_corruption_counts_and_determinism():
    x = torch.rand(500, 1, 28, 28) * 2 - 1
    xc, corrupted, f = D.corrupt_pixels(x, 0.3, 0.1, 0.9, torch.Generator().manual_seed(3))
    changed = (xc != x).flatten(1).sum(1)
    assert 100 < corrupted.sum() < 200
    assert torch.equal(changed[corrupted], torch.round(f[corrupted] * 784).long())
    assert (changed[~corrupted] == 0).all() and (f[~corrupted] == 0).all()
    assert ((f[corrupted] >= 0.1) & (f[corrupted] <= 0.9)).all()
    assert xc.min() >= -1 and xc.max() <= 1
    xc2, c2, f2 = D.corrupt_pixels(x, 0.3, 0.1, 0.9, torch.Generator().manual_seed(3))
    assert torch.equal(xc, xc2) and torch.equal(corrupted, c2) and torch.equal(f, f2)
    xc3, _, _ = D.corrupt_pixels(x, 0.3, 0.1, 0.9, torch.Generator().manual_seed(4))
    assert not torch.equal(xc, xc3)


def test_label_corruption_flips_to_another_class():
    y = torch.randint(0, 10, (5000,))
    yc, corrupted, _ = D.corrupt_labels(y, 0.3, torch.Generator().manual_seed(0))
    assert (yc[corrupted] != y[corrupted]).all()
    assert (yc[~corrupted] == y[~corrupted]).all()
    assert abs(corrupted.float().mean().item() - 0.3) < 0.03
    counts = torch.bincount((yc[corrupted] - y[corrupted]) % 10, minlength=10)
    assert counts[0] == 0 and counts[1:].min() > 0.6 * counts[1:].float().mean()  # uniform over others


# ----------------------------------------------------------------------------------------------
# Models and metrics
# ----------------------------------------------------------------------------------------------

def test_reference_checkpoint_layout_loads_and_pooling_order_is_exact():
    ref = HERE.parent / "shared" / "reference" / "seed_data_rater.pt"
    rater = D.DataRater()
    if ref.is_file():
        rater.load_state_dict(torch.load(ref, map_location="cpu", weights_only=True))
    assert [k for k in D.ToyCNN().state_dict()] == [
        "layers.0.weight", "layers.0.bias", "layers.3.weight", "layers.3.bias",
        "layers.7.weight", "layers.7.bias", "layers.9.weight", "layers.9.bias"]
    # our layers pool before the activation; the reference's order gives identical scores
    import torch.nn as nn
    l = rater.layers
    ref_order = nn.Sequential(l[0], nn.ReLU(), nn.MaxPool2d(2), l[3], nn.Tanh(), nn.MaxPool2d(2), nn.Flatten())
    x = torch.rand(64, 1, 28, 28) * 2 - 1
    assert torch.allclose(rater(x), rater.head(ref_order(x)).squeeze(-1), atol=1e-6)


def test_metrics_against_hand_computed_values():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert D.spearman(a, a ** 3) == pytest.approx(1.0)
    assert D.spearman(a, -a) == pytest.approx(-1.0)
    assert D.rankdata(torch.tensor([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
    # AUROC: positives {0.9, 0.4}, negatives {0.5, 0.1}: pairs won 3 of 4
    assert D.auroc(torch.tensor([0.9, 0.4, 0.5, 0.1]), torch.tensor([True, True, False, False])) == 0.75
    assert D.auroc(torch.tensor([1.0, 1.0]), torch.tensor([True, False])) == 0.5  # a tie counts half
    assert D.pearson(a, 2 * a + 1) == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------------
# Population: persistence, ages, staggered refresh
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_population_keeps_its_inner_updates(opt):
    cfg = cfg_for("--inner-optimizer", opt, "--num-inner-models", "3", "--inner-lr", "0.05",
                  "--meta-refresh-steps", "1000")
    rater, model, pop, batch = tiny_setup(cfg, B=8)
    theta0 = {k: v.clone() for k, v in pop.theta.items()}
    opt0 = pop.opt_slice(1)
    rater_opt = torch.optim.Adam(rater.parameters(), lr=1e-3)
    with torch.no_grad():
        scores = rater(batch["xs"][1].flatten(0, 1)).view(cfg.inner_steps, -1)
    D.meta_step(rater, rater_opt, model, pop, batch, cfg)
    # replay model 1's T updates by hand, with the rater as it was before its update
    theta = {k: v[1].clone().requires_grad_() for k, v in theta0.items()}
    state = opt0
    for t in range(cfg.inner_steps):
        w = torch.softmax(scores[t] / cfg.temperature, 0)
        logits = torch.func.functional_call(model, theta, (batch["xs"][1, t],))
        loss = (w * torch.nn.functional.cross_entropy(logits, batch["ys"][1, t], reduction="none")).sum()
        g = dict(zip(theta, torch.autograd.grad(loss, list(theta.values()))))
        theta, state = D.inner_update(theta, state, g, cfg)
        theta = {k: v.detach().requires_grad_() for k, v in theta.items()}
    for k in theta:
        assert torch.allclose(pop.theta[k][1], theta[k], rtol=1e-10, atol=1e-12)
        assert not torch.allclose(pop.theta[k][1], theta0[k][1])
    assert pop.ages.tolist() == [1, 334, 667]  # (i * K) // N, then + 1


def test_staggered_refresh():
    cfg = cfg_for("--num-inner-models", "4", "--meta-refresh-steps", "6", "--inner-lr", "0.05")
    rater, model, pop, batch = tiny_setup(cfg, B=4)
    assert pop.ages.tolist() == [0, 1, 3, 4]  # spread evenly over [0, K)
    rater_opt = torch.optim.SGD(rater.parameters(), lr=0.0)
    before = {k: v.clone() for k, v in pop.theta.items()}
    D.meta_step(rater, rater_opt, model, pop, batch, cfg)
    D.meta_step(rater, rater_opt, model, pop, batch, cfg)
    # model 3 reached age 6 at the second step: re-initialised, its Adam state reset (t counts
    # inner updates: 2 meta-steps x T = 2)
    assert pop.ages.tolist() == [2, 3, 5, 0]
    assert pop.refreshes == 1
    w = "layers.0.weight"
    assert not torch.allclose(pop.theta[w][3], before[w][3])
    assert (pop.opt["t"] == torch.tensor([4.0, 4.0, 4.0, 0.0], dtype=pop.opt["t"].dtype)).all()
    assert all((v[3] == 0).all() for v in pop.opt["m"].values())
    # a fresh init: its statistics are those of PyTorch's default init, not of trained weights
    fresh_std = D.ToyCNN().layers[0].weight.std().item()
    assert abs(pop.theta[w][3].std().item() - fresh_std) < 0.5 * fresh_std
    for _ in range(6 * 3):
        D.meta_step(rater, rater_opt, model, pop, batch, cfg)
    # model i (initial age a_i) refreshes at steps K - a_i, 2K - a_i, ... <= 20
    assert pop.refreshes == 3 + 3 + 3 + 4
    assert pop.ages.tolist() == [2, 3, 5, 0]
