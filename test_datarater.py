"""Tests: numeric checks against independent references (finite differences, a replay of the
inner updates), and end-to-end runs of the CLI on tiny budgets.

    python -m pytest -q test_datarater.py

Tests that need MNIST look in $DATARATER_DATA, then ../shared/data, then ./data, and skip
with a reason when none holds it.
"""

import json
import math
import os
import signal
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


def test_cropped_channels_last_models_equal_the_plain_layers_in_value_and_gradient():
    # model_input crops 28x28 to 26x26 and goes channels-last; the plain layers on the full,
    # NCHW image must give the same logits / scores and the same parameter gradients
    torch.manual_seed(0)
    x = torch.rand(32, 1, 28, 28) * 2 - 1
    for net, plain in [(D.ToyCNN(), lambda m, x: m.layers(x)),
                       (D.DataRater(), lambda m, x: m.head(m.layers(x)).squeeze(-1))]:
        out, ref = net(x), plain(net, x)
        assert torch.allclose(out, ref, atol=1e-5)
        g = torch.autograd.grad(out.square().sum(), list(net.parameters()))
        g_ref = torch.autograd.grad(ref.square().sum(), list(net.parameters()))
        for a, b in zip(g, g_ref):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
        # the cropped pixels really are dead: changing them moves nothing in the plain network
        x2 = x.clone()
        x2[..., 26:, :] = torch.rand_like(x2[..., 26:, :])
        x2[..., :, 26:] = torch.rand_like(x2[..., :, 26:])
        assert torch.allclose(plain(net, x2), ref, atol=1e-5)


def test_data_conv_has_the_first_and_second_derivatives_of_conv2d():
    torch.manual_seed(0)
    conv = D.DataConv2d(1, 4, 3).double()
    plain = torch.nn.Conv2d(1, 4, 3).double()
    plain.load_state_dict(conv.state_dict())
    x = torch.randn(6, 1, 9, 9, dtype=torch.float64)
    w = torch.rand(6, dtype=torch.float64, requires_grad=True)  # per-sample weights, as the meta-gradient
    out = []
    for layer in (conv, plain):
        y = layer(x)
        inner = (w * y.square().mean((1, 2, 3))).sum()                      # weighted inner loss
        g = torch.autograd.grad(inner, [layer.weight, layer.bias], create_graph=True)
        outer = (layer(x) - 0.1 * g[0].sum()).tanh().sum() + g[1].square().sum()
        out.append((y, *g, *torch.autograd.grad(outer, [w, layer.weight])))
    for a, b in zip(*out):
        assert torch.allclose(a, b, atol=1e-12)


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
    cfg = cfg_for("--num-inner-models", "4", "--meta-refresh-steps", "6", "--inner-lr", "0.05",
                  "--inner-optimizer", "adam")  # Adam, so that its state's reset is checked too
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


# ----------------------------------------------------------------------------------------------
# The CLI end to end (tiny budgets on a slice of real MNIST)
# ----------------------------------------------------------------------------------------------

def tiny_args(out, *extra):
    return ["--data-dir", MNIST or "./data", "--device", "cpu", "--train-samples", "1000", "--batch-size", "16",
            "--num-inner-models", "2", "--meta-steps", "4", "--eval-every", "2", "--checkpoint-every", "2",
            "--downstream-seeds", "2", "--out-dir", str(out), "--log", "false", *extra]


def evals_without_timing(out):
    m = json.loads((Path(out) / "metrics.json").read_text())
    return m["eval"], m["final"]


@needs_mnist
def test_cli_smoke_run_writes_all_outputs(tmp_path, capsys):
    out = tmp_path / "run"
    assert D.main(tiny_args(out)) == 0
    for f in ("config.json", "data_rater.pt", "metrics.json", "outer_loss.csv", "state.pt",
              "downstream.json", "downstream.md", "eval_scores.csv"):
        assert (out / f).is_file(), f
    m = json.loads((out / "metrics.json").read_text())
    assert [e["step"] for e in m["eval"]] == [0, 2, 4]
    assert m["meta_steps"] == 4 and m["seconds_per_meta_step_median"] > 0
    assert 0.0 <= m["final"]["auroc"] <= 1.0 and -1.0 <= m["final"]["spearman"] <= 1.0
    assert len((out / "outer_loss.csv").read_text().splitlines()) == 5
    sd = torch.load(out / "data_rater.pt", weights_only=True)
    D.DataRater().load_state_dict(sd)  # a plain state_dict in the reference layout
    ds = json.loads((out / "downstream.json").read_text())
    assert set(ds["accuracy"]) == set(D.DOWNSTREAM_METHODS)
    assert all(len(v) == 2 and all(0.1 < a <= 1.0 for a in v) for v in ds["accuracy"].values())
    assert ds["summary"]["oracle"]["dropped_corrupted_fraction"] > 0.5  # oracle drops the corrupted first
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["meta_steps"] == 4 and cfg["batch_size"] == 16
    rows = (out / "eval_scores.csv").read_text().splitlines()
    assert rows[0] == "step,f,score" and len(rows) == 1 + 3 * 1000  # 1000 test images x 3 evals
    # --overwrite: nothing of the first run survives to mix with the second (which writes no
    # downstream results and evaluates at different steps)
    (out / "notes.txt").write_text("a file of the user's")
    assert D.main(tiny_args(out, "--overwrite", "--skip-downstream", "--eval-every", "4")) == 0
    assert not (out / "downstream.json").exists() and not (out / "downstream.md").exists()
    rows = (out / "eval_scores.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 1000 and {r.split(",")[0] for r in rows[1:]} == {"0", "4"}
    assert (out / "notes.txt").is_file()  # only the files a run writes are removed


@needs_mnist
def test_reference_command_spellings_run_unchanged(tmp_path):
    # the reference implementation's documented command, on a tiny budget, as a real process
    cmd = [sys.executable, str(HERE / "datarater.py"), "--dataset_name=mnist", "--inner_model_name=ToyCNN",
           "--data_rater_model_name=DataRater", "--train_split_ratio=0.8", "--batch_size=16", "--inner_lr=1e-3",
           "--outer_lr=3e-4", "--meta_steps=2", "--inner_steps=2", "--meta_refresh_steps=150",
           "--grad_clip_norm=5.0", "--num_inner_models=2", "--loss_type=cross_entropy",
           "--save_data_rater_checkpoint=True", "--log=True", "--skip_downstream=True",
           f"--data_dir={MNIST}", "--train_samples=500", "--eval_every=2", f"--out_dir={tmp_path / 'r'}"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "step     2/2" in p.stdout and "final: Spearman" in p.stdout
    assert (tmp_path / "r" / "data_rater.pt").is_file()


@needs_mnist
def test_rater_learns_on_real_mnist(tmp_path):
    """40 meta-steps of the default method (SGD inner, tau 10) on a slice of real MNIST, with the
    full batch and population but a short-budget outer optimiser (plain Adam at lr 1e-3, constant;
    the default momentum 0.99 and cosine decay are for 1000 steps): the rater must rank test
    images by corruption and start to find the corrupted training samples. At initialisation every
    score is equal (zero-initialised head): AUROC 0.5. Measured here: rho -0.71, AUROC 0.80,
    precision 0.37 (chance: 0.1)."""
    out = tmp_path / "learn"
    args = tiny_args(out, "--skip-downstream", "--meta-steps", "40", "--eval-every", "40",
                     "--train-samples", "6000", "--batch-size", "128", "--num-inner-models", "8",
                     "--outer-lr", "1e-3", "--outer-beta1", "0.9", "--outer-lr-schedule", "constant")
    assert D.main(args) == 0
    evals, final = evals_without_timing(out)
    assert evals[0]["auroc"] == 0.5
    assert final["spearman"] < -0.5
    assert final["auroc"] > 0.7
    assert final["precision_at_rho"] > 0.25  # 10% of the samples are corrupted: chance is 0.1


# ----------------------------------------------------------------------------------------------
# Long runs: checkpoint, resume, determinism, failures
# ----------------------------------------------------------------------------------------------

def rater_tensors(out):
    return torch.load(Path(out) / "data_rater.pt", weights_only=True)


@needs_mnist
def test_resume_equals_uninterrupted_and_runs_are_deterministic(tmp_path, monkeypatch):
    base = ["--skip-downstream", "--meta-steps", "6", "--eval-every", "3", "--checkpoint-every", "3"]
    assert D.main(tiny_args(tmp_path / "full", *base)) == 0
    assert D.main(tiny_args(tmp_path / "again", *base)) == 0
    # the same run, interrupted by SIGINT during meta-step 3 (it finishes the step, saves, exits)
    real_sample, calls = D.sample_batch, []

    def interrupting_sample(*a):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real_sample(*a)

    monkeypatch.setattr(D, "sample_batch", interrupting_sample)
    assert D.main(tiny_args(tmp_path / "split", *base)) == 130
    monkeypatch.setattr(D, "sample_batch", real_sample)
    assert torch.load(tmp_path / "split" / "state.pt", weights_only=False)["step"] == 3
    assert D.main(tiny_args(tmp_path / "split", *base, "--resume")) == 0
    full, again, split = (rater_tensors(tmp_path / n) for n in ("full", "again", "split"))
    for k in full:
        assert torch.equal(full[k], again[k]), k   # determinism: bit-identical
        assert torch.equal(full[k], split[k]), k   # resume: bit-identical
    assert evals_without_timing(tmp_path / "full") == evals_without_timing(tmp_path / "again")
    assert evals_without_timing(tmp_path / "full") == evals_without_timing(tmp_path / "split")
    loss = lambda n: (tmp_path / n / "outer_loss.csv").read_text()
    assert loss("full") == loss("split") == loss("again")
    scores = lambda n: (tmp_path / n / "eval_scores.csv").read_text()
    assert scores("full") == scores("split") == scores("again")
    pa, pb = (torch.load(tmp_path / n / "state.pt", weights_only=False)["population"] for n in ("full", "split"))
    assert all(torch.equal(pa["theta"][k], pb["theta"][k]) for k in pa["theta"])


@needs_mnist
def test_resume_refuses_a_changed_model_or_data(tmp_path, capsys):
    assert D.main(tiny_args(tmp_path / "r", "--skip-downstream", "--meta-steps", "2")) == 0
    capsys.readouterr()
    assert D.main(tiny_args(tmp_path / "r", "--skip-downstream", "--meta-steps", "2", "--resume",
                            "--corruption-prob", "0.3")) == 2
    err = capsys.readouterr().err
    assert "corruption_prob" in err and err.count("\n") == 1
    # a bigger step budget alone is fine
    assert D.main(tiny_args(tmp_path / "r", "--skip-downstream", "--meta-steps", "3", "--resume")) == 0
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["meta_steps"] == 3


def test_failed_checkpoint_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "state.pt"
    D.atomic_save({"step": 1, "w": torch.ones(3)}, path)
    real_save = torch.save

    def dying_save(obj, f, *a, **k):  # writes half a file, then the "machine dies"
        real_save(obj, f, *a, **k)
        with open(f, "r+b") as fh:
            fh.truncate(10)
        raise OSError(28, "No space left on device", str(f))

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError):
        D.atomic_save({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(path, weights_only=False)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]  # no half-written file left


@needs_mnist
def test_disk_error_during_a_run_is_one_line_and_keeps_the_checkpoint(tmp_path, monkeypatch, capsys):
    real_save, calls = torch.save, []

    def save(obj, f, *a, **k):
        calls.append(str(f))
        if len(calls) > 2:  # the checkpoint of step 2 (state.pt, data_rater.pt) succeeds, step 4 fails
            raise OSError(28, "No space left on device", str(f))
        real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    assert D.main(tiny_args(tmp_path / "r", "--skip-downstream", "--meta-steps", "4")) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and err.count("\n") == 1
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(tmp_path / "r" / "state.pt", weights_only=False)["step"] == 2
    assert not list((tmp_path / "r").glob("*.tmp"))


@needs_mnist
def test_nonfinite_outer_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    real_step, n = D.meta_step, []

    def flaky_step(*a):
        n.append(1)
        return float("nan") if len(n) == 3 else real_step(*a)

    monkeypatch.setattr(D, "meta_step", flaky_step)
    assert D.main(tiny_args(tmp_path / "stop", "--skip-downstream", "--checkpoint-every", "1")) == 1
    err = capsys.readouterr().err
    assert "meta-step 3" in err and "last good checkpoint" in err and err.count("\n") == 1
    assert torch.load(tmp_path / "stop" / "state.pt", weights_only=False)["step"] == 2
    n.clear()
    assert D.main(tiny_args(tmp_path / "skip", "--skip-downstream", "--skip-nonfinite")) == 0
    m = json.loads((tmp_path / "skip" / "metrics.json").read_text())
    assert m["skipped_nonfinite"] == 1 and m["meta_steps"] == 4


@needs_mnist
def test_ctrl_c_saves_state_and_resume_finishes(tmp_path):
    import signal as sig
    out = tmp_path / "r"
    cmd = [sys.executable, "-u", str(HERE / "datarater.py"), *tiny_args(out, "--skip-downstream", "--log", "true",
           "--meta-steps", "100000", "--checkpoint-every", "100000", "--eval-every", "100000")]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in p.stdout:  # wait until training is under way
        if line.startswith("step"):
            break
    p.send_signal(sig.SIGINT)
    rest, _ = p.communicate(timeout=120)
    assert p.returncode == 130
    assert "saved the full state" in rest
    step = torch.load(out / "state.pt", weights_only=False)["step"]
    assert step >= 10
    assert D.main(tiny_args(out, "--skip-downstream", "--meta-steps", str(step + 2), "--resume")) == 0
    assert json.loads((out / "metrics.json").read_text())["meta_steps"] == step + 2


# ----------------------------------------------------------------------------------------------
# Bad input: exit code 2, one line naming the problem, nothing written
# ----------------------------------------------------------------------------------------------

def write_file(path, data):
    Path(path).write_bytes(data)
    return str(path)


def bad_inputs(tmp):
    """(argv without --out-dir, a word the message must contain, needs MNIST)."""
    torch.save(D.ToyCNN().state_dict(), tmp / "toycnn.pt")
    good = tmp / "good_rater.pt"
    torch.save(D.DataRater().state_dict(), good)
    write_file(tmp / "truncated.pt", good.read_bytes()[:200])
    write_file(tmp / "a_file", b"x")
    (tmp / "empty_data").mkdir()
    (tmp / "existing").mkdir()
    (tmp / "existing" / "config.json").write_text("{}")
    return [
        (["--corruption-prob", "1.5"], "--corruption-prob", False),
        (["--corruption-prob", "-0.1"], "--corruption-prob", False),
        (["--corruption-min", "0.8", "--corruption-max", "0.2"], "--corruption-min", False),
        (["--corruption-max", "2"], "--corruption-max", False),
        (["--batch-size", "0"], "--batch-size", False),
        (["--num-inner-models", "-1"], "--num-inner-models", False),
        (["--inner-steps", "0"], "--inner-steps", False),
        (["--meta-steps", "0"], "--meta-steps", False),
        (["--meta-steps", "ten"], "--meta-steps", False),
        (["--temperature", "0"], "--temperature", False),
        (["--inner-lr", "-1"], "--inner-lr", False),
        (["--outer-lr", "nan"], "--outer-lr", False),
        (["--train-split-ratio", "1.0"], "--train-split-ratio", False),
        (["--discard-fraction", "1.0"], "--discard-fraction", False),
        (["--inner-model-name", "ResNet50"], "ResNet50", False),
        (["--data-rater-model-name", "Nope"], "Nope", False),
        (["--dataset", "cifar10"], "cifar10", False),
        (["--corruption", "blur"], "--corruption", False),
        (["--no-such-flag"], "--no-such-flag", False),
        (["--eval-only"], "--load-checkpoint", False),
        (["--eval-only", "--load-checkpoint", str(tmp / "missing.pt")], "missing.pt", False),
        (["--eval-only", "--load-checkpoint", str(tmp / "toycnn.pt")], "does not fit", False),
        (["--eval-only", "--load-checkpoint", str(tmp / "truncated.pt")], "truncated.pt", False),
        (["--eval-only", "--load-checkpoint", str(tmp / "a_file")], "a_file", False),
        (["--resume"], "state.pt", False),
        (["--data-dir", str(tmp / "empty_data")], "train-images-idx3-ubyte", False),
        (["--batch-size", "900"], "--batch-size", True),
        (["--train-samples", "70000"], "--train-samples", True),
    ]


def test_bad_inputs_exit_2_with_one_line_and_write_nothing(tmp_path, capsys, monkeypatch):
    import urllib.request
    import urllib.error

    def no_network(*a, **k):
        raise urllib.error.URLError("no network in this test")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    cases = bad_inputs(tmp_path)
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "CUDA", False))
    assert len(cases) >= 15
    for i, (argv, word, data) in enumerate(cases):
        if data and MNIST is None:
            continue
        out = tmp_path / f"out{i}"
        full = ["--data-dir", MNIST or str(tmp_path / "empty_data"), "--train-samples", "1000", "--log", "false",
                "--out-dir", str(out), *argv]
        before = sorted(p.name for p in tmp_path.iterdir())
        assert D.main(full) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("datarater.py: error:"), (argv, err)
        assert word in err, (argv, err)
        assert not out.exists(), argv
        assert sorted(p.name for p in tmp_path.iterdir()) == before, argv
    # an existing output folder, and one whose parent is a file
    for argv, word in ((["--out-dir", str(tmp_path / "existing")], "--overwrite"),
                       (["--out-dir", str(tmp_path / "a_file" / "run")], "a_file")):
        assert D.main(["--data-dir", MNIST or "x", *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and word in err, err
    assert sorted(p.name for p in (tmp_path / "existing").iterdir()) == ["config.json"]


def test_bad_input_exit_code_of_the_real_process(tmp_path):
    p = subprocess.run([sys.executable, str(HERE / "datarater.py"), "--corruption-prob=2",
                        f"--out-dir={tmp_path / 'o'}"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.strip() == "datarater.py: error: --corruption-prob must be in [0, 1], got 2.0"
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------------------------
# Downstream filtering, statistics, figures, reproduce.sh
# ----------------------------------------------------------------------------------------------

class NoiseRater(torch.nn.Module):
    """A stand-in rater that knows the answer: noisy images score low."""

    def forward(self, x):
        return -x.flatten(1).abs().mean(1)


def synthetic_data(n=640, prob=0.25):
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (n,), generator=gen)
    x = torch.zeros(n, 1, 28, 28)
    x[torch.arange(n), 0, y, y] = 1.0  # a learnable class signal
    corrupted = torch.rand(n, generator=gen) < prob
    x[corrupted] = torch.rand(int(corrupted.sum()), 1, 28, 28, generator=gen) * 2 - 1
    yt = torch.randint(0, 10, (200,), generator=gen)
    xt = torch.zeros(200, 1, 28, 28)
    xt[torch.arange(200), 0, yt, yt] = 1.0
    return {"x_train": x, "y_train": y, "corrupted": corrupted, "x_test": xt, "y_test": yt}


def test_downstream_methods_drop_what_they_should():
    cfg = cfg_for("--batch-size", "32", "--discard-fraction", "0.2", "--downstream-lr", "1e-2")
    data = synthetic_data()
    res = {m: D.train_downstream(m, NoiseRater(), data, cfg, seed=0, device=torch.device("cpu"))
           for m in D.DOWNSTREAM_METHODS}
    assert math.isnan(res["baseline"][1])              # baseline drops nothing
    assert res["filtered"][1] == 1.0                   # 25% corrupted > 20% dropped: all drops corrupted
    assert res["oracle"][1] == 1.0
    assert 0.1 < res["random"][1] < 0.4                # random drops ~25% corrupted
    assert all(0.0 <= a <= 1.0 for a, _ in res.values())
    # the same seed gives the same result (paired seeds are reproducible)
    again = D.train_downstream("filtered", NoiseRater(), data, cfg, seed=0, device=torch.device("cpu"))
    assert again == res["filtered"]


def test_paired_confidence_interval():
    mean, lo, hi = D.paired_ci([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
    half = 4.303 * 1.0 / math.sqrt(3)  # t(0.975, df=2) * sd / sqrt(n)
    assert mean == pytest.approx(2.0) and lo == pytest.approx(2 - half) and hi == pytest.approx(2 + half)


def test_run_downstream_summary_and_markdown():
    cfg = cfg_for("--batch-size", "32", "--discard-fraction", "0.2", "--downstream-seeds", "3")
    ds = D.run_downstream(NoiseRater(), synthetic_data(), cfg, torch.device("cpu"), log=lambda *_: None)
    assert len(ds["seeds"]) == 3 and all(len(v) == 3 for v in ds["accuracy"].values())
    diffs = [f - b for f, b in zip(ds["accuracy"]["filtered"], ds["accuracy"]["baseline"])]
    assert ds["filtered_minus_baseline"]["mean"] == pytest.approx(sum(diffs) / 3)
    lo, hi = ds["filtered_minus_baseline"]["ci95"]
    assert lo <= ds["filtered_minus_baseline"]["mean"] <= hi
    md = D.downstream_markdown(ds, vars(cfg))
    assert md.count("\n| ") == 5 and "oracle" in md and "95% CI" in md


@needs_mnist
def test_reproduce_quick_makes_figures_and_tables(tmp_path):
    env = {**os.environ, "DATARATER_DATA": MNIST, "PYTHON": sys.executable}
    p = subprocess.run(["bash", str(HERE / "reproduce.sh"), "--quick", "--out", str(tmp_path / "res")],
                       capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    res = tmp_path / "res"
    for f in ("score_vs_corruption.png", "training_curves.png", "downstream.png"):
        assert (res / f).stat().st_size < 400_000
        assert (res / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for run in ("pixels", "pixels_hard"):
        ds = json.loads((res / run / "downstream.json").read_text())
        assert set(ds["summary"]) == set(D.DOWNSTREAM_METHODS)
        assert "| oracle" in (res / run / "downstream.md").read_text()
    if (HERE.parent / "shared" / "reference" / "seed_data_rater.pt").is_file():
        ref = json.loads((res / "reference_checkpoint_eval.json").read_text())
        assert -1 <= ref["spearman"] <= 1 and 0 <= ref["auroc"] <= 1
    assert "done in" in p.stdout
