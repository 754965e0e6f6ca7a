"""DataRater: meta-learned dataset curation, in one readable PyTorch file.

A reference implementation of Calian et al., "DataRater: Meta-Learned Dataset Curation",
NeurIPS 2025 (arXiv 2505.17895), on corrupted MNIST. A small network (the rater, parameters
eta) scores every training example; inside an inner batch the scores become weights by a
softmax; a population of inner models (ToyCNN, parameters theta) trains on the weighted
loss; the rater is updated by meta-gradients, i.e. by backpropagating a clean held-out loss
through T unrolled inner updates. Afterwards the rater filters data: drop the lowest-scored
part of every batch.

    pip install -r requirements.txt
    python datarater.py                         # meta-train, evaluate, filter (runs/<name>/)
    python datarater.py --benchmark             # seconds per meta-step, nothing written
    python -m pytest -q test_datarater.py       # the tests

Symbols follow the paper: eta = rater parameters, theta = inner-model parameters, T = unroll
length (--inner-steps), tau = softmax temperature (--temperature), rho = discard fraction
(--discard-fraction), K = population refresh period (--meta-refresh-steps).

Layout, in the order data flows: config/CLI -> data + corruption -> models -> THE META-GRADIENT
(the DataRater algorithm proper) -> population -> rater evaluation -> downstream filtering ->
checkpoints -> outputs/figures -> main().
"""

import argparse
import contextlib
import io
import json
import math
import os
import random
import resource
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call


# =============================================================================================
# Config and CLI
# =============================================================================================

class UsageError(Exception):
    """Bad input from the user: reported as one line, exit code 2, nothing written."""


def str2bool(s):
    if isinstance(s, bool):
        return s
    if s.lower() in ("1", "true", "yes", "y", "on"):
        return True
    if s.lower() in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {s!r}")


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def build_parser():
    p = OneLineParser(description="DataRater (arXiv 2505.17895) on corrupted MNIST. "
                      "Underscore spellings (--inner_lr) and --flag=True booleans are accepted.")
    flag = dict(type=str2bool, nargs="?", const=True)  # --x, --x=True, --x false

    g = p.add_argument_group("data")
    g.add_argument("--dataset", "--dataset-name", dest="dataset", default="mnist",
                   help="torchvision MNIST-format dataset: one of DATASETS (default: mnist)")
    g.add_argument("--data-dir", default=os.environ.get("DATARATER_DATA", "./data"),
                   help="torchvision root folder; downloaded there if missing "
                        "(default: $DATARATER_DATA or ./data)")
    g.add_argument("--train-split-ratio", type=float, default=0.8,
                   help="fraction of the training set for inner training; the rest is the clean "
                        "validation set of the outer loss (default: 0.8)")
    g.add_argument("--train-samples", type=int, default=0,
                   help="use only this many (shuffled) training images before the split, for quick "
                        "runs and tests; 0 = all (default: 0)")
    g.add_argument("--corruption", default="pixels", choices=["pixels", "labels"],
                   help="pixels: replace a fraction f of pixels by uniform noise (the reference's); "
                        "labels: flip to another class (default: pixels)")
    g.add_argument("--corruption-prob", type=float, default=0.1,
                   help="probability that a training sample is corrupted (default: 0.1)")
    g.add_argument("--corruption-min", type=float, default=0.1,
                   help="smallest pixel fraction f of a corrupted sample (default: 0.1)")
    g.add_argument("--corruption-max", type=float, default=0.9,
                   help="largest pixel fraction f of a corrupted sample (default: 0.9)")

    g = p.add_argument_group("models")
    g.add_argument("--inner-model-name", default="ToyCNN", help="key of MODELS (default: ToyCNN)")
    g.add_argument("--data-rater-model-name", default="DataRater",
                   help="key of RATERS (default: DataRater)")
    g.add_argument("--rater-head-init-scale", type=float, default=0.0,
                   help="scale of the rater head's initial weights; 0 starts every score equal "
                        "(uniform weights), so that no score differences come from the random "
                        "initialisation (default: 0.0)")
    g.add_argument("--loss-type", default="cross_entropy", choices=["cross_entropy", "mse"],
                   help="per-sample loss of inner and outer problems (default: cross_entropy)")

    g = p.add_argument_group("meta-training")
    g.add_argument("--meta-steps", type=int, default=1000,
                   help="outer (rater) updates (default: 1000)")
    g.add_argument("--batch-size", type=int, default=128,
                   help="inner batch B, also the outer batch (default: 128)")
    g.add_argument("--num-inner-models", type=int, default=8,
                   help="population size N (default: 8)")
    g.add_argument("--inner-steps", type=int, default=2,
                   help="unroll length T: inner updates the meta-gradient flows through (default: 2)")
    g.add_argument("--meta-refresh-steps", type=int, default=150,
                   help="K: an inner model is re-initialised at age K; initial ages are spread "
                        "over [0, K) so the population spans early and late training (default: 150)")
    g.add_argument("--inner-optimizer", default="sgd", choices=["sgd", "adam"],
                   help="differentiable inner optimiser; adam is the paper's, sgd made the rater "
                        "separate clean from corrupted without late decay here (default: sgd)")
    g.add_argument("--inner-lr", type=float, default=1e-3, help="inner learning rate (default: 1e-3)")
    g.add_argument("--temperature", type=float, default=10.0,
                   help="tau of softmax(scores / tau) over the inner batch; a large tau lets scores "
                        "spread widely before the weights saturate (default: 10.0)")
    g.add_argument("--outer-lr", type=float, default=3e-4,
                   help="Adam learning rate of the rater (default: 3e-4)")
    g.add_argument("--outer-beta1", type=float, default=0.99,
                   help="beta1 (momentum) of the rater's Adam; 0.99 averages the noisy meta-gradient "
                        "over ~100 steps and separated clean from corrupted best (default: 0.99)")
    g.add_argument("--outer-lr-schedule", default="cosine", choices=["constant", "cosine"],
                   help="outer learning rate over meta-steps: constant, or cosine decay to 0 at "
                        "--meta-steps; cosine slows the late drift of the rater (default: cosine)")
    g.add_argument("--grad-clip-norm", type=float, default=5.0,
                   help="global L2 norm clip of the meta-gradient; 0 disables (default: 5.0)")
    g.add_argument("--vectorize-population", **flag, default=False,
                   help="run the N inner models as one vmapped model instead of a Python loop; "
                        "same mathematics, faster on GPU (default: false)")

    g = p.add_argument_group("evaluation and filtering")
    g.add_argument("--eval-every", type=int, default=100,
                   help="evaluate the rater every this many meta-steps (default: 100)")
    g.add_argument("--discard-fraction", type=float, default=0.1,
                   help="rho: fraction of each batch the rater drops downstream (default: 0.1)")
    g.add_argument("--skip-downstream", **flag, default=False,
                   help="skip the downstream filtering comparison at the end (default: false)")
    g.add_argument("--downstream-epochs", type=int, default=1,
                   help="epochs of each downstream ToyCNN (default: 1)")
    g.add_argument("--downstream-seeds", type=int, default=5,
                   help="seeds per downstream method, paired across methods (default: 5)")
    g.add_argument("--downstream-lr", type=float, default=1e-3,
                   help="Adam learning rate of downstream models (default: 1e-3)")

    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0, help="seed of data split, corruption, init (default: 0)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto = cuda when available (default: auto)")
    g.add_argument("--out-dir", default=None, help="output folder (default: runs/<dataset>_<corruption>_seed<seed>)")
    g.add_argument("--overwrite", **flag, default=False, help="allow an existing --out-dir (default: false)")
    g.add_argument("--resume", **flag, default=False, help="continue the run in --out-dir from state.pt (default: false)")
    g.add_argument("--checkpoint-every", type=int, default=100,
                   help="write the full training state every this many meta-steps (default: 100)")
    g.add_argument("--skip-nonfinite", **flag, default=False,
                   help="skip (and count) a meta-update whose outer loss is not finite, instead of "
                        "stopping (default: false)")
    g.add_argument("--save-data-rater-checkpoint", **flag, default=True,
                   help="write data_rater.pt (default: true)")
    g.add_argument("--log", **flag, default=True, help="print progress lines (default: true)")
    g.add_argument("--eval-only", **flag, default=False,
                   help="evaluate the rater of --load-checkpoint and exit (default: false)")
    g.add_argument("--downstream-only", **flag, default=False,
                   help="run the downstream comparison with --load-checkpoint and exit (default: false)")
    g.add_argument("--load-checkpoint", default=None, help="a rater state_dict (data_rater.pt)")
    g.add_argument("--benchmark", **flag, default=False,
                   help="time meta-steps on synthetic data, print, write nothing (default: false)")
    g.add_argument("--benchmark-steps", type=int, default=10, help="timed meta-steps (default: 10)")
    g.add_argument("--figures", nargs="+", default=None, metavar="RUN_DIR",
                   help="draw the figures from finished run folders into --out-dir and exit")
    return p


def normalise_argv(argv):
    """--inner_lr=1e-3 -> --inner-lr=1e-3 (the reference implementation's spellings)."""
    out = []
    for a in argv:
        if a.startswith("--"):
            name, eq, value = a.partition("=")
            a = name.replace("_", "-") + eq + value
        out.append(a)
    return out


def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg = build_parser().parse_args(normalise_argv(argv))
    validate(cfg)
    return cfg


def validate(cfg):
    """Reject bad input before anything is loaded or written."""
    def need(ok, msg):
        if not ok:
            raise UsageError(msg)

    for name in ("corruption_prob", "corruption_min", "corruption_max"):
        v = getattr(cfg, name)
        need(0.0 <= v <= 1.0, f"--{name.replace('_', '-')} must be in [0, 1], got {v}")
    need(cfg.corruption_min <= cfg.corruption_max,
         f"--corruption-min ({cfg.corruption_min}) must be <= --corruption-max ({cfg.corruption_max})")
    need(0.0 < cfg.train_split_ratio < 1.0,
         f"--train-split-ratio must be in (0, 1), got {cfg.train_split_ratio}")
    need(0.0 <= cfg.discard_fraction < 1.0,
         f"--discard-fraction must be in [0, 1), got {cfg.discard_fraction}")
    for name in ("meta_steps", "batch_size", "num_inner_models", "inner_steps", "meta_refresh_steps",
                 "eval_every", "checkpoint_every", "downstream_epochs", "downstream_seeds",
                 "benchmark_steps"):
        v = getattr(cfg, name)
        need(v > 0, f"--{name.replace('_', '-')} must be a positive integer, got {v}")
    for name in ("inner_lr", "outer_lr", "temperature", "downstream_lr"):
        v = getattr(cfg, name)
        need(math.isfinite(v) and v > 0, f"--{name.replace('_', '-')} must be a positive number, got {v}")
    need(cfg.train_samples >= 0, f"--train-samples must be >= 0, got {cfg.train_samples}")
    need(math.isfinite(cfg.rater_head_init_scale) and cfg.rater_head_init_scale >= 0,
         f"--rater-head-init-scale must be >= 0, got {cfg.rater_head_init_scale}")
    need(0.0 <= cfg.outer_beta1 < 1.0, f"--outer-beta1 must be in [0, 1), got {cfg.outer_beta1}")
    need(math.isfinite(cfg.grad_clip_norm) and cfg.grad_clip_norm >= 0,
         f"--grad-clip-norm must be >= 0, got {cfg.grad_clip_norm}")
    need(cfg.dataset in DATASETS, f"--dataset: unknown dataset {cfg.dataset!r}; known: {', '.join(DATASETS)}")
    need(cfg.inner_model_name in MODELS,
         f"--inner-model-name: unknown model {cfg.inner_model_name!r}; known: {', '.join(MODELS)}")
    need(cfg.data_rater_model_name in RATERS,
         f"--data-rater-model-name: unknown rater {cfg.data_rater_model_name!r}; known: {', '.join(RATERS)}")
    need(not (cfg.device == "cuda" and not torch.cuda.is_available()),
         "--device cuda: CUDA is not available on this machine (use --device cpu or auto)")
    need(not ((cfg.eval_only or cfg.downstream_only) and not cfg.load_checkpoint),
         "--eval-only/--downstream-only need --load-checkpoint PATH")
    need(not (cfg.resume and cfg.overwrite), "--resume and --overwrite exclude each other")
    if cfg.out_dir is None:
        cfg.out_dir = str(Path("runs") / f"{cfg.dataset}_{cfg.corruption}_seed{cfg.seed}")
    cfg.device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device


# =============================================================================================
# Data and corruption
# =============================================================================================

# name -> torchvision class name; a user adds another MNIST-format dataset here in one line.
DATASETS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "kmnist": "KMNIST"}
IMAGE_SHAPE, NUM_CLASSES = (1, 28, 28), 10


def load_split(name, root, train):
    """One split as tensors: x [n, 1, 28, 28] in [-1, 1] (the reference's normalisation), y [n]."""
    import torchvision.datasets as tvd
    cls = getattr(tvd, DATASETS[name])
    folder = Path(root) / cls.__name__ / "raw"
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            ds = cls(root=root, train=train, download=True)
    except Exception as e:  # no network, partial files, corrupt archive
        files = ", ".join(u.rsplit("/", 1)[-1].removesuffix(".gz") for u, _ in cls.resources)
        raise UsageError(f"--data-dir: cannot load {name} from {folder} and download failed "
                         f"({type(e).__name__}); expected the four files {files} there") from None
    x = ds.data.unsqueeze(1).float().div_(255.0).sub_(0.5).div_(0.5)
    return x, ds.targets.long()


def corrupt_pixels(x, prob, f_min, f_max, gen):
    """Replace exactly round(f * 784) distinct pixels of each corrupted image by U(-1, 1) noise.

    Returns (x_corrupted, corrupted [n] bool, f [n]); f = 0 for clean samples. Vectorised: a
    random score per pixel, and the k lowest-ranked pixels of a row are the ones replaced.
    """
    n, d = x.shape[0], x[0].numel()
    corrupted = torch.rand(n, generator=gen) < prob
    f = torch.where(corrupted, f_min + (f_max - f_min) * torch.rand(n, generator=gen), torch.zeros(n))
    k = torch.round(f * d).long()                                         # [n]
    idx = corrupted.nonzero().squeeze(1)
    ranks = torch.rand(len(idx), d, generator=gen).argsort(1).argsort(1)  # [m, d] a permutation
    mask = ranks < k[idx, None]                                           # k distinct pixels
    noise = torch.rand(len(idx), d, generator=gen) * 2 - 1
    flat = x.reshape(n, d).clone()
    flat[idx] = torch.where(mask, noise, flat[idx])
    return flat.view_as(x), corrupted, f


def corrupt_labels(y, prob, gen, num_classes=NUM_CLASSES):
    """Flip each label with probability prob to a different class, uniformly."""
    corrupted = torch.rand(len(y), generator=gen) < prob
    shift = torch.randint(1, num_classes, (len(y),), generator=gen)
    return torch.where(corrupted, (y + shift) % num_classes, y), corrupted, corrupted.float()


def make_data(cfg):
    """Train/val/test tensors; the training set corrupted once from cfg.seed.

    Returns a dict with x_train, y_train, corrupted, frac (ground truth, for evaluation only),
    x_val, y_val (clean: the outer loss), x_test, y_test (clean), x_test_c, f_test (every test
    image corrupted with its own f ~ U(0, 1): the score-vs-corruption evaluation).
    """
    x, y = load_split(cfg.dataset, cfg.data_dir, train=True)
    x_test, y_test = load_split(cfg.dataset, cfg.data_dir, train=False)
    gen = torch.Generator().manual_seed(cfg.seed)
    perm = torch.randperm(len(x), generator=gen)
    if cfg.train_samples:
        if cfg.train_samples > len(x):
            raise UsageError(f"--train-samples {cfg.train_samples} exceeds the {len(x)} training images")
        perm = perm[:cfg.train_samples]
    n_tr = int(round(cfg.train_split_ratio * len(perm)))
    tr, va = perm[:n_tr], perm[n_tr:]
    for split, n in (("inner-train", len(tr)), ("validation", len(va))):
        if cfg.batch_size > n:
            raise UsageError(f"--batch-size {cfg.batch_size} is larger than the {split} split ({n} samples)")
    x_tr, y_tr = x[tr], y[tr]
    if cfg.corruption == "pixels":
        x_tr, corrupted, frac = corrupt_pixels(x_tr, cfg.corruption_prob, cfg.corruption_min,
                                               cfg.corruption_max, gen)
    else:
        y_tr, corrupted, frac = corrupt_labels(y_tr, cfg.corruption_prob, gen)
    x_test_c, _, f_test = corrupt_pixels(x_test, 1.0, 0.0, 1.0, torch.Generator().manual_seed(cfg.seed + 1))
    return dict(x_train=x_tr, y_train=y_tr, corrupted=corrupted, frac=frac, x_val=x[va], y_val=y[va],
                x_test=x_test, y_test=y_test, x_test_c=x_test_c, f_test=f_test)


# =============================================================================================
# Models
# =============================================================================================
# Both keep the reference implementation's module indices (layers.0, layers.3, ...), so its
# checkpoints load with load_state_dict. Four changes that alter nothing mathematically, for speed:
# - max-pool comes before the ReLU / Tanh (both are monotone, so pool(act(x)) == act(pool(x))),
#   so the activation and its double backward run on 4x fewer elements;
# - the image is cropped to 26x26 (see model_input);
# - on CPU the image enters in channels-last layout, which the convolutions keep: oneDNN's
#   convolutions and PyTorch's CPU max-pool are several times faster in it than in NCHW;
# - the inner model's first convolution is a DataConv2d (below), whose double backward skips
#   a gradient nobody uses.

def model_input(x):
    """x [B, 1, 28, 28] -> [B, 1, 26, 26], as both networks below read it (same outputs, less work).

    The second max-pool floors 11x11 to 5x5, so the second convolution's last output row and column
    are never used, nor are the pixels that only they see: the image's last two rows and columns.
    Cropping them changes no output and no gradient and saves ~16% of every convolution.
    """
    x = x[..., :26, :26]
    if x.device.type == "cpu" and not torch._C._functorch.is_batchedtensor(x):  # not under vmap
        x = x.to(memory_format=torch.channels_last)
    return x


class DataConv2d(nn.Conv2d):
    """nn.Conv2d for a layer whose input is data, never differentiated: same values and gradients.

    The meta-gradient differentiates each inner weight gradient once more. For a convolution,
    PyTorch's double backward then always computes a gradient for the layer's input too, even
    when the input is the image and nothing uses it; for the first layer that is a transposed
    convolution to one channel, ~10% of a CPU meta-step. Here the weight and bias gradients are
    their own autograd Function, whose derivative is just the forward convolution they came from.
    """

    def __init__(self, in_channels, out_channels, kernel_size):  # stride 1, no padding, with bias
        super().__init__(in_channels, out_channels, kernel_size)

    def forward(self, x):
        if torch._C._functorch.is_batchedtensor(x) or x.requires_grad:   # under vmap, or not data
            return super().forward(x)
        return _DataConv.apply(x, self.weight, self.bias)


class _DataConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):                     # y = conv2d(x, weight) + bias
        ctx.save_for_backward(x, weight)
        return F.conv2d(x, weight, bias)

    @staticmethod
    def backward(ctx, gy):                                 # differentiable: create_graph works
        x, weight = ctx.saved_tensors
        return None, *_ConvParamGrad.apply(gy, x, weight)


class _ConvParamGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gy, x, weight):                       # (dL/dweight, dL/dbias): linear in gy
        ctx.save_for_backward(x)
        _, gw, gb = torch.ops.aten.convolution_backward(
            gy, x, weight, [weight.shape[0]], [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [False, True, True])
        return gw, gb

    @staticmethod
    def backward(ctx, ggw, ggb):                           # its transpose: the forward convolution
        x, = ctx.saved_tensors
        return F.conv2d(x, ggw, ggb), None, None


class ToyCNN(nn.Module):
    def __init__(self, num_classes=NUM_CLASSES):
        super().__init__()
        self.layers = nn.Sequential(
            DataConv2d(1, 16, 3), nn.MaxPool2d(2), nn.ReLU(),   # [B, 16, 12, 12] (13 x 13 uncropped)
            nn.Conv2d(16, 32, 3), nn.MaxPool2d(2), nn.ReLU(),   # [B, 32, 5, 5]
            nn.Flatten(), nn.Linear(800, 128), nn.ReLU(), nn.Linear(128, num_classes))

    def forward(self, x):
        return self.layers(model_input(x))                        # logits [B, 10]


class DataRater(nn.Module):
    def __init__(self, head_init_scale=1.0):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(1, 8, 3), nn.MaxPool2d(2), nn.ReLU(),     # [B, 8, 12, 12] (13 x 13 uncropped)
            nn.Conv2d(8, 16, 3), nn.MaxPool2d(2), nn.Tanh(),    # [B, 16, 5, 5]
            nn.Flatten())
        self.head = nn.Linear(400, 1)
        with torch.no_grad():
            self.head.weight.mul_(head_init_scale)

    def forward(self, x):
        return self.head(self.layers(model_input(x))).squeeze(-1)  # one score per sample [B]


# name -> nn.Module class. Plug in another model by adding an entry (any module mapping
# [B, 1, 28, 28] to logits [B, 10], or to scores [B] for a rater): the meta-gradient code only
# uses it through torch.func.functional_call.
MODELS = {"ToyCNN": ToyCNN}
RATERS = {"DataRater": DataRater}


def new_rater(cfg):
    if cfg.data_rater_model_name == "DataRater":
        return DataRater(cfg.rater_head_init_scale)
    return RATERS[cfg.data_rater_model_name]()


def per_sample_loss(logits, y, loss_type):
    """[B] losses. mse: squared error between logits and the one-hot label, as the reference."""
    if loss_type == "mse":
        return (logits - F.one_hot(y, logits.shape[-1]).to(logits.dtype)).pow(2).mean(-1)
    return F.cross_entropy(logits, y, reduction="none")


# =============================================================================================
# THE META-GRADIENT: the DataRater algorithm proper (paper Sec. 2)
# =============================================================================================
# One inner model: theta_{t+1} = U(theta_t, grad_theta sum_b w_b(eta) l(x_b, y_b; theta_t)),
# with w(eta) = softmax(rater_eta(x) / tau) over the inner batch. After T such updates, the
# outer loss is the plain (unweighted) loss on clean held-out data, and the meta-gradient
# d L_outer(theta_T(eta)) / d eta flows back through all T updates (create_graph=True).
# Parameters are dicts {name: tensor}: one model's, or the population's stacked along dim 0.

ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8


def inner_update(theta, opt, grads, cfg):
    """One differentiable optimiser step. opt = {"t": steps taken [] or [N], "m": {...}, "v": {...}}."""
    if cfg.inner_optimizer == "sgd":
        return {k: p - cfg.inner_lr * grads[k] for k, p in theta.items()}, opt
    b1, b2 = ADAM_BETAS
    t = opt["t"] + 1
    new_theta, m, v = {}, {}, {}
    for k, p in theta.items():
        tk = t.reshape(t.shape + (1,) * (p.dim() - t.dim()))      # broadcast per-model step count
        m[k] = b1 * opt["m"][k] + (1 - b1) * grads[k]
        v[k] = b2 * opt["v"][k] + (1 - b2) * grads[k] * grads[k]
        m_hat, v_hat = m[k] / (1 - b1 ** tk), v[k] / (1 - b2 ** tk)
        # eps inside the sqrt: d sqrt(v) / dv is infinite at v = 0 (dead ReLUs, unused max-pool
        # inputs), which turns meta-gradients into NaN. sqrt(v + eps^2) ~ sqrt(v) + eps elsewhere.
        new_theta[k] = p - cfg.inner_lr * m_hat / torch.sqrt(v_hat + ADAM_EPS ** 2)
    return new_theta, {"t": t, "m": m, "v": v}


def weighted_inner_loss(model, theta, scores, x, y, cfg):
    """sum_b softmax(scores / tau)_b * l_b. Shapes: scores [B], x [B, 1, 28, 28], y [B]."""
    w = torch.softmax(scores / cfg.temperature, dim=-1)          # weights over the inner batch
    losses = per_sample_loss(functional_call(model, theta, (x,)), y, cfg.loss_type)
    return (w * losses).sum()


def unroll(model, theta, opt, scores, xs, ys, cfg):
    """T differentiable inner updates of one model. scores/ys [T, B], xs [T, B, 1, 28, 28]."""
    for t in range(cfg.inner_steps):
        loss = weighted_inner_loss(model, theta, scores[t], xs[t], ys[t], cfg)
        grads = torch.autograd.grad(loss, list(theta.values()), create_graph=True)
        theta, opt = inner_update(theta, opt, dict(zip(theta, grads)), cfg)
    return theta, opt


def unroll_population_vmapped(model, theta, opt, scores, xs, ys, cfg):
    """The same T updates for all N models at once. theta: stacked {k: [N, ...]}, scores [N, T, B].

    vmap only batches the forward pass; the losses of different models are independent, so the
    gradient of their sum is each model's own gradient, and autograd.grad runs unchanged.
    """
    forward = torch.func.vmap(lambda p, x: functional_call(model, p, (x,)))
    for t in range(cfg.inner_steps):
        w = torch.softmax(scores[:, t] / cfg.temperature, dim=-1)                      # [N, B]
        logits = forward(theta, xs[:, t])                                              # [N, B, 10]
        losses = per_sample_loss(logits.flatten(0, 1), ys[:, t].flatten(), cfg.loss_type)
        loss = (w * losses.view_as(w)).sum()
        grads = torch.autograd.grad(loss, list(theta.values()), create_graph=True)
        theta, opt = inner_update(theta, opt, dict(zip(theta, grads)), cfg)
    return theta, opt


def outer_loss(rater, eta, model, pop, batch, cfg):
    """Mean over the population of the clean validation loss after T inner updates.

    eta: the rater's parameters {name: tensor}. pop: stacked population (see Population).
    batch: xs [N, T, B, 1, 28, 28], ys [N, T, B], x_val [N, B, 1, 28, 28], y_val [N, B].
    Returns (loss, theta_T, opt_T), the latter two stacked and still attached to the graph.
    """
    xs, ys, x_val, y_val = batch["xs"], batch["ys"], batch["x_val"], batch["y_val"]
    N, T, B = ys.shape
    # the rater scores each model's T batches; chunks of T * B are faster on CPU than one pass
    scores = torch.stack([functional_call(rater, eta, (xs[i].flatten(0, 1),)) for i in range(N)]).view(N, T, B)
    theta0 = {k: v.detach().requires_grad_() for k, v in pop.theta.items()}
    if cfg.vectorize_population:
        theta, opt = unroll_population_vmapped(model, theta0, pop.opt, scores, xs, ys, cfg)
        logits = torch.func.vmap(lambda p, x: functional_call(model, p, (x,)))(theta, x_val)
        return per_sample_loss(logits.flatten(0, 1), y_val.flatten(), cfg.loss_type).mean(), theta, opt
    losses, thetas, opts = [], [], []
    for i in range(N):                                  # a plain loop: fastest on CPU
        theta_i, opt_i = unroll(model, {k: v[i] for k, v in theta0.items()}, pop.opt_slice(i),
                                scores[i], xs[i], ys[i], cfg)
        logits = functional_call(model, theta_i, (x_val[i],))
        losses.append(per_sample_loss(logits, y_val[i], cfg.loss_type).mean())
        thetas.append(theta_i)
        opts.append(opt_i)
    return torch.stack(losses).mean(), stack_dicts(thetas), stack_opts(opts)


def meta_gradient(rater, model, pop, batch, cfg):
    """(outer loss, d loss / d eta as a list matching rater.parameters(), theta_T, opt_T)."""
    eta = dict(rater.named_parameters())
    loss, theta, opt = outer_loss(rater, eta, model, pop, batch, cfg)
    grads = torch.autograd.grad(loss, list(eta.values()))
    return loss.detach(), grads, theta, opt


def meta_step(rater, rater_opt, model, pop, batch, cfg):
    """One outer update of eta, and every inner model keeps its T updates (truncated backprop).

    Returns the outer loss (a float). When it is not finite nothing is updated.
    """
    loss, grads, theta, opt = meta_gradient(rater, model, pop, batch, cfg)
    if not torch.isfinite(loss):
        return loss.item()
    for p, g in zip(rater.parameters(), grads):
        p.grad = g
    if cfg.grad_clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(rater.parameters(), cfg.grad_clip_norm)  # global L2 norm
    rater_opt.step()
    rater_opt.zero_grad(set_to_none=True)
    pop.advance(theta, opt)
    return loss.item()


# =============================================================================================
# The population of inner models
# =============================================================================================

def stack_dicts(ds):
    return {k: torch.stack([d[k] for d in ds]) for k in ds[0]}


def stack_opts(opts):
    if "m" not in opts[0]:
        return opts[0]
    return {"t": torch.stack([o["t"] for o in opts]), "m": stack_dicts([o["m"] for o in opts]),
            "v": stack_dicts([o["v"] for o in opts])}


class Population:
    """N inner models that keep their parameters and optimiser state across meta-steps.

    Parameters are stacked along dim 0 (theta[k]: [N, ...]). Model i is re-initialised when its
    age (meta-steps since its last initialisation) reaches K; initial ages are spread evenly over
    [0, K), so at any time the population spans early and late training (the paper's stratified
    lifetimes). Initialisation draws from the global torch RNG (saved in checkpoints).
    """

    def __init__(self, model, cfg, device, dtype=torch.float32):
        self.model, self.cfg, self.device, self.dtype = model, cfg, device, dtype
        N, K = cfg.num_inner_models, cfg.meta_refresh_steps
        inits = [self.fresh_params() for _ in range(N)]
        self.theta = stack_dicts(inits)
        self.opt = self.fresh_opt(N)
        self.ages = torch.tensor([(i * K) // N for i in range(N)], dtype=torch.long)
        self.refreshes = 0

    def fresh_params(self):
        m = type(self.model)().to(self.device, self.dtype)
        return {k: v.detach() for k, v in m.named_parameters()}

    def fresh_opt(self, n):
        if self.cfg.inner_optimizer == "sgd":
            return {}
        zeros = {k: torch.zeros_like(v) for k, v in self.theta.items()}
        return {"t": torch.zeros(n, device=self.device, dtype=self.dtype), "m": zeros,
                "v": {k: v.clone() for k, v in zeros.items()}}

    def opt_slice(self, i):
        if not self.opt:
            return {}
        return {"t": self.opt["t"][i], "m": {k: v[i] for k, v in self.opt["m"].items()},
                "v": {k: v[i] for k, v in self.opt["v"].items()}}

    def advance(self, theta, opt):
        """Keep the T updates (detached: the next meta-step's graph starts here), age, refresh."""
        self.theta = {k: v.detach() for k, v in theta.items()}
        if opt:
            self.opt = {"t": opt["t"].detach(), "m": {k: v.detach() for k, v in opt["m"].items()},
                        "v": {k: v.detach() for k, v in opt["v"].items()}}
        self.ages += 1
        for i in (self.ages >= self.cfg.meta_refresh_steps).nonzero().flatten().tolist():
            self.refresh(i)

    def refresh(self, i):
        for k, v in self.fresh_params().items():
            self.theta[k][i] = v
        if self.opt:
            self.opt["t"][i] = 0
            for k in self.theta:
                self.opt["m"][k][i] = 0
                self.opt["v"][k][i] = 0
        self.ages[i] = 0
        self.refreshes += 1

    def state_dict(self):
        return {"theta": self.theta, "opt": self.opt, "ages": self.ages, "refreshes": self.refreshes}

    def load_state_dict(self, s):
        self.theta, self.opt = s["theta"], s["opt"]
        self.ages, self.refreshes = s["ages"], s["refreshes"]


def sample_batch(data, cfg, device):
    """Random inner batches [N, T, B] from the corrupted training split and clean validation
    batches [N, B], drawn with the global torch RNG (every model and step its own batch)."""
    N, T, B = cfg.num_inner_models, cfg.inner_steps, cfg.batch_size
    i_tr = torch.randint(len(data["y_train"]), (N, T, B))
    i_va = torch.randint(len(data["y_val"]), (N, B))
    return {"xs": data["x_train"][i_tr].to(device), "ys": data["y_train"][i_tr].to(device),
            "x_val": data["x_val"][i_va].to(device), "y_val": data["y_val"][i_va].to(device)}


# =============================================================================================
# Rater evaluation (torch only: no scipy / sklearn)
# =============================================================================================

def rankdata(x):
    """Ranks 1..n with ties averaged (as scipy.stats.rankdata)."""
    x = x.double().flatten()
    order = x.argsort()
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(1, len(x) + 1, dtype=x.dtype)
    _, inv, counts = torch.unique(x, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(counts), dtype=x.dtype).scatter_add_(0, inv, ranks)
    return (sums / counts)[inv]


def pearson(a, b):
    """Pearson correlation; nan when either side is constant (a zero-initialised head)."""
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    denom = a.norm() * b.norm()
    return (a @ b / denom).item() if denom > 0 else float("nan")


def spearman(a, b):
    return pearson(rankdata(a), rankdata(b))


def auroc(scores, positive):
    """P(score of a positive > score of a negative), ties counted half (Mann-Whitney U)."""
    r = rankdata(scores)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return ((r[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)).item()


@torch.no_grad()
def score(rater, x, device, chunk=8192):
    rater.eval()
    out = torch.cat([rater(x[i:i + chunk].to(device)).float().cpu() for i in range(0, len(x), chunk)])
    rater.train()
    return out


def evaluate_rater(rater, data, cfg, device):
    """Score-vs-corruption on held-out test images (each with its own f ~ U(0, 1)), and how
    well scores separate the clean from the corrupted training samples."""
    s_test = score(rater, data["x_test_c"], device)
    s_train = score(rater, data["x_train"], device)
    corrupted = data["corrupted"]
    k = int(round(cfg.discard_fraction * len(s_train)))
    lowest = s_train.argsort()[:k]
    return {"spearman": spearman(s_test, data["f_test"]),
            "pearson_r2": pearson(s_test, data["f_test"]) ** 2,
            "auroc": auroc(s_train, ~corrupted),            # clean scored above corrupted
            "precision_at_rho": corrupted[lowest].float().mean().item() if k else float("nan"),
            "score_clean_mean": s_train[~corrupted].mean().item(),
            "score_corrupted_mean": s_train[corrupted].mean().item() if corrupted.any() else float("nan")}


# =============================================================================================
# Downstream: train fresh models with and without the rater's filtering
# =============================================================================================

DOWNSTREAM_METHODS = ("baseline", "filtered", "random", "oracle")


def train_downstream(method, rater, data, cfg, seed, device):
    """Clean test accuracy of a fresh inner model trained with one data-selection method.

    baseline: batches of B from a shuffled stream. The others draw M = ceil(B / (1 - rho)) and
    keep B: filtered, the B highest-scored (the paper's batch-level top-K); random, B at random;
    oracle, clean samples first (uses the ground truth: an upper bound). Same steps, same B, and
    for one seed the same initialisation and data stream for every method.
    Returns (accuracy, fraction of dropped samples that were corrupted).
    """
    B = cfg.batch_size
    M = B if method == "baseline" else math.ceil(B / (1 - cfg.discard_fraction))
    n = len(data["y_train"])
    steps = cfg.downstream_epochs * math.ceil(n / B)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = MODELS[cfg.inner_model_name]().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.downstream_lr)
    stream = torch.cat([torch.randperm(n, generator=gen) for _ in range(math.ceil(steps * M / n) + 1)])
    tie_break = torch.Generator().manual_seed(seed + 10_000)
    dropped = dropped_bad = 0
    for s in range(steps):
        idx = stream[s * M:(s + 1) * M]
        if M > B:
            if method == "filtered":
                keep = score(rater, data["x_train"][idx], device).argsort(descending=True)[:B]
            elif method == "random":
                keep = torch.randperm(M, generator=tie_break)[:B]
            else:  # oracle: clean first, then corrupted, random order inside each group
                key = data["corrupted"][idx].float() + torch.rand(M, generator=tie_break) * 0.5
                keep = key.argsort()[:B]
            mask = torch.ones(M, dtype=torch.bool)
            mask[keep] = False
            dropped += int(mask.sum())
            dropped_bad += int(data["corrupted"][idx][mask].sum())
            idx = idx[keep]
        x, y = data["x_train"][idx].to(device), data["y_train"][idx].to(device)
        loss = per_sample_loss(model(x), y, cfg.loss_type).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        model.eval()
        correct = sum((model(data["x_test"][i:i + 4096].to(device)).argmax(-1).cpu()
                       == data["y_test"][i:i + 4096]).sum().item() for i in range(0, len(data["y_test"]), 4096))
    return correct / len(data["y_test"]), (dropped_bad / dropped if dropped else float("nan"))


def mean_std(v):
    t = torch.tensor(v, dtype=torch.float64)
    return t.mean().item(), (t.std().item() if len(v) > 1 else 0.0)


# two-sided 95% Student-t quantiles by degrees of freedom (no scipy)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
       10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}


def paired_ci(a, b):
    """Mean of a - b over paired seeds with its 95% t-interval."""
    d = [x - y for x, y in zip(a, b)]
    m, s = mean_std(d)
    if len(d) < 2:
        return m, float("nan"), float("nan")
    df = len(d) - 1
    t = T95.get(df, T95[max(k for k in T95 if k <= df)])
    h = t * s / math.sqrt(len(d))
    return m, m - h, m + h


def run_downstream(rater, data, cfg, device, log=print):
    seeds = [cfg.seed * 1000 + i for i in range(cfg.downstream_seeds)]
    acc = {m: [] for m in DOWNSTREAM_METHODS}
    precision = {m: [] for m in DOWNSTREAM_METHODS}
    for seed in seeds:
        for m in DOWNSTREAM_METHODS:
            a, p = train_downstream(m, rater, data, cfg, seed, device)
            acc[m].append(a)
            precision[m].append(p)
            log(f"downstream seed {seed} {m:8s} accuracy {a:.4f}")
    out = {"seeds": seeds, "discard_fraction": cfg.discard_fraction, "epochs": cfg.downstream_epochs,
           "accuracy": acc, "dropped_corrupted_fraction": precision, "summary": {}}
    for m in DOWNSTREAM_METHODS:
        mu, sd = mean_std(acc[m])
        out["summary"][m] = {"mean": mu, "std": sd,
                             "dropped_corrupted_fraction": mean_std(precision[m])[0] if m != "baseline" else None}
    d, lo, hi = paired_ci(acc["filtered"], acc["baseline"])
    out["filtered_minus_baseline"] = {"mean": d, "ci95": [lo, hi]}
    gap = out["summary"]["oracle"]["mean"] - out["summary"]["baseline"]["mean"]
    out["gap_closed"] = d / gap if gap > 0 else float("nan")
    return out


def downstream_markdown(ds, cfg):
    label = {"baseline": "baseline (every sample)", "filtered": f"filtered (rater drops {ds['discard_fraction']:.0%})",
             "random": f"random drop ({ds['discard_fraction']:.0%})",
             "oracle": "oracle (drops known-corrupted; uses ground truth)"}
    lines = [f"Clean test accuracy of ToyCNN, {ds['epochs']} epoch(s), {len(ds['seeds'])} paired seeds; "
             f"corruption: {cfg['corruption']}, prob {cfg['corruption_prob']}, "
             f"f in [{cfg['corruption_min']}, {cfg['corruption_max']}].", "",
             "| method | accuracy (mean +- std) | dropped that were corrupted |", "|---|---|---|"]
    for m in DOWNSTREAM_METHODS:
        s = ds["summary"][m]
        p = "-" if s["dropped_corrupted_fraction"] is None else f"{s['dropped_corrupted_fraction']:.3f}"
        lines.append(f"| {label[m]} | {s['mean']:.4f} +- {s['std']:.4f} | {p} |")
    d = ds["filtered_minus_baseline"]
    lines += ["", f"filtered - baseline (paired by seed): {d['mean']:+.4f}, 95% CI "
              f"[{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]; fraction of the baseline-to-oracle gap "
              f"closed: {ds['gap_closed']:.2f}", ""]
    return "\n".join(lines)


# =============================================================================================
# Checkpoints (atomic: a crash mid-write leaves the previous file whole)
# =============================================================================================

def atomic_write(path, write):
    """write(tmp) to a temporary file beside path, then rename it over path."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_save(obj, path):
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_text(text, path):
    atomic_write(path, lambda tmp: tmp.write_text(text))


def load_rater(cfg, device):
    """A rater from --load-checkpoint: a plain state_dict (ours or the reference's)."""
    path = Path(cfg.load_checkpoint)
    if not path.is_file():
        raise UsageError(f"--load-checkpoint: no such file {path}")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"--load-checkpoint: {path} is not a readable torch checkpoint ({type(e).__name__})") from None
    if isinstance(sd, dict) and "rater" in sd and isinstance(sd["rater"], dict):
        sd = sd["rater"]  # a full training state (state.pt)
    rater = RATERS[cfg.data_rater_model_name]()
    try:
        rater.load_state_dict(sd)
    except Exception as e:
        first = str(e).strip().splitlines()
        raise UsageError(f"--load-checkpoint: {path} does not fit {cfg.data_rater_model_name} "
                         f"({first[0] if first else type(e).__name__})") from None
    return rater.to(device)


# Flags a resumed run may change: budget, reporting and where it runs, not the model or data.
RESUMABLE_CHANGES = {"meta_steps", "figures", "benchmark", "benchmark_steps", "eval_every",
                     "checkpoint_every", "log", "resume", "overwrite",
                     "device", "skip_downstream", "downstream_epochs", "downstream_seeds",
                     "downstream_lr", "skip_nonfinite", "save_data_rater_checkpoint"}


def training_state(step, rater, rater_opt, pop, history):
    return {"step": step, "rater": rater.state_dict(), "rater_opt": rater_opt.state_dict(),
            "population": pop.state_dict(), "history": history,
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}}


def restore_state(state, rater, rater_opt, pop):
    rater.load_state_dict(state["rater"])
    rater_opt.load_state_dict(state["rater_opt"])
    pop.load_state_dict(state["population"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])  # unused by this file; kept for code that adds it
    if state["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["step"], state["history"]


RUN_FILES = ("config.json", "metrics.json", "outer_loss.csv", "eval_scores.csv", "data_rater.pt",
             "state.pt", "downstream.json", "downstream.md")


def prepare_out_dir(cfg):
    """Check the output folder before any work: refuse to clobber, check it is writable."""
    out = Path(cfg.out_dir)
    if cfg.resume:
        if not (out / "state.pt").is_file():
            raise UsageError(f"--resume: no state.pt in {out}")
        old = json.loads((out / "config.json").read_text())
        changed = sorted(k for k in old if k not in RESUMABLE_CHANGES and old[k] != vars(cfg).get(k))
        if changed:
            raise UsageError(f"--resume: the run in {out} used a different config ({', '.join(changed)}); "
                             "only the step budget and reporting may change")
    elif out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise UsageError(f"--out-dir {out} exists and is not empty; pass --resume or --overwrite")
    probe = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    if not probe.is_dir():
        raise UsageError(f"--out-dir: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"--out-dir: {probe} is not writable")


# =============================================================================================
# Meta-training loop
# =============================================================================================

def build(cfg, device):
    """A fresh rater, its Adam, an inner-model template and the population (global RNG)."""
    rater = new_rater(cfg).to(device)
    model = MODELS[cfg.inner_model_name]().to(device)
    rater_opt = torch.optim.Adam(rater.parameters(), lr=cfg.outer_lr, betas=(cfg.outer_beta1, 0.999))
    return rater, rater_opt, model, Population(model, cfg, device)


def set_seed(seed):
    torch.manual_seed(seed)


class StopSignal:
    """Ctrl-C / SIGTERM finish the current meta-step, save a checkpoint, then stop."""

    def __init__(self):
        self.received = None

    def __enter__(self):
        self.old = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)


def train(cfg, data, log=print):
    """Meta-train a rater; writes into cfg.out_dir. Returns (rater, metrics dict)."""
    device = torch.device(cfg.device)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not cfg.resume:  # --overwrite: no file of an earlier run may survive to mix with this one
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
    set_seed(cfg.seed)
    rater, rater_opt, model, pop = build(cfg, device)
    history = {"eval": [], "outer_loss": [], "step_seconds": [], "skipped_nonfinite": 0}
    step = 0
    if cfg.resume:
        step, history = restore_state(torch.load(out / "state.pt", map_location=device, weights_only=False),
                                      rater, rater_opt, pop)
        log(f"resumed from {out / 'state.pt'} at meta-step {step}")
    atomic_write_text(json.dumps(vars(cfg), indent=2), out / "config.json")

    def save_state():
        atomic_save(training_state(step, rater, rater_opt, pop, history), out / "state.pt")
        if cfg.save_data_rater_checkpoint:
            atomic_save(rater.state_dict(), out / "data_rater.pt")

    def evaluate():
        m = evaluate_rater(rater, data, cfg, device)
        m["step"] = step
        history["eval"].append(m)
        write_eval_scores(rater, data, device, step, history, out)
        return m

    if step == 0 and not history["eval"]:
        evaluate()
    last_rho = history["eval"][-1]["spearman"] if history["eval"] else float("nan")
    with StopSignal() as stop:
        while step < cfg.meta_steps:
            t0 = time.perf_counter()
            batch = sample_batch(data, cfg, device)
            if cfg.outer_lr_schedule == "cosine":
                for g in rater_opt.param_groups:
                    g["lr"] = cfg.outer_lr * 0.5 * (1 + math.cos(math.pi * step / cfg.meta_steps))
            loss = meta_step(rater, rater_opt, model, pop, batch, cfg)
            if not math.isfinite(loss):
                if not cfg.skip_nonfinite:
                    raise FloatingPointError(
                        f"non-finite outer loss ({loss}) at meta-step {step + 1}; the last good "
                        f"checkpoint is {out / 'state.pt'} (meta-step {checkpoint_step(out)})")
                history["skipped_nonfinite"] += 1
            step += 1
            history["outer_loss"].append(loss)
            history["step_seconds"].append(time.perf_counter() - t0)
            if step % cfg.eval_every == 0 or step == cfg.meta_steps:
                m = evaluate()
                last_rho = m["spearman"]
                if cfg.log:
                    log(f"eval step {step}: Spearman {m['spearman']:+.4f}  R^2 {m['pearson_r2']:.4f}  "
                        f"AUROC {m['auroc']:.4f}  precision@rho {m['precision_at_rho']:.4f}")
            if step % cfg.checkpoint_every == 0 or step == cfg.meta_steps:
                save_state()
            if cfg.log and (step % 10 == 0 or step == cfg.meta_steps):
                sec = sorted(history["step_seconds"][-50:])[len(history["step_seconds"][-50:]) // 2]
                log(f"step {step:5d}/{cfg.meta_steps}  outer loss {loss:.4f}  rho {last_rho:+.3f}  "
                    f"{sec:.3f} s/step  ~{sec * (cfg.meta_steps - step) / 60:.1f} min left")
            if stop.received:
                save_state()
                log(f"{stop.received}: saved the full state at meta-step {step} to {out / 'state.pt'}; "
                    f"continue with --resume")
                raise KeyboardInterrupt
    atomic_write_text("step,outer_loss\n" + "".join(f"{i + 1},{v:.6f}\n" for i, v in
                                                   enumerate(history["outer_loss"])), out / "outer_loss.csv")
    return rater, summarise(history, cfg)


def checkpoint_step(out):
    try:
        return torch.load(Path(out) / "state.pt", map_location="cpu", weights_only=False)["step"]
    except Exception:
        return "none"


def summarise(history, cfg):
    evals = history["eval"]
    final = evals[-1]
    secs = sorted(history["step_seconds"]) or [float("nan")]
    return {"final": final, "best_spearman": min((e["spearman"] for e in evals if not math.isnan(e["spearman"])),
                                                    default=float("nan")),
            "eval": evals, "seconds_per_meta_step_median": secs[len(secs) // 2],
            "meta_steps": len(history["outer_loss"]), "skipped_nonfinite": history["skipped_nonfinite"]}


def write_eval_scores(rater, data, device, step, history, out, n=1000):
    """Scores of the first n corrupted test images at this step (for the scatter figure). They are
    kept in the history, so the CSV is rewritten whole and matches the run after a resume."""
    history.setdefault("eval_scores", []).append((step, score(rater, data["x_test_c"][:n], device).tolist()))
    f = data["f_test"][:n].tolist()
    atomic_write_text("step,f,score\n" + "".join(f"{st},{fi:.4f},{v:.5f}\n" for st, scores in history["eval_scores"]
                                                  for fi, v in zip(f, scores)), Path(out) / "eval_scores.csv")


# =============================================================================================
# Benchmark
# =============================================================================================

def benchmark(cfg, log=print):
    """Median seconds per meta-step at this configuration, on synthetic MNIST-shaped data."""
    from torch.utils.flop_counter import FlopCounterMode
    device = torch.device(cfg.device)
    set_seed(cfg.seed)
    n = max(4096, cfg.batch_size)
    data = {"x_train": torch.rand(n, *IMAGE_SHAPE) * 2 - 1, "y_train": torch.randint(0, NUM_CLASSES, (n,)),
            "x_val": torch.rand(n, *IMAGE_SHAPE) * 2 - 1, "y_val": torch.randint(0, NUM_CLASSES, (n,))}
    rater, rater_opt, model, pop = build(cfg, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with FlopCounterMode(display=False) as fc:
        meta_step(rater, rater_opt, model, pop, sample_batch(data, cfg, device), cfg)
    flops = fc.get_total_flops()
    for _ in range(3):  # warm-up
        meta_step(rater, rater_opt, model, pop, sample_batch(data, cfg, device), cfg)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(cfg.benchmark_steps):
        batch = sample_batch(data, cfg, device)
        sync()
        t0 = time.perf_counter()
        meta_step(rater, rater_opt, model, pop, batch, cfg)
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    med = times[len(times) // 2]
    mem = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
           else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    res = {"device": str(device), "threads": torch.get_num_threads(),
           "population": "vmap" if cfg.vectorize_population else "loop",
           "batch_size": cfg.batch_size, "num_inner_models": cfg.num_inner_models, "inner_steps": cfg.inner_steps,
           "median_s": med, "min_s": times[0], "max_s": times[-1], "steps_timed": len(times),
           "inner_samples_per_s": cfg.num_inner_models * cfg.inner_steps * cfg.batch_size / med,
           "gflop_per_step": flops / 1e9, "achieved_gflops": flops / 1e9 / med,
           "peak_memory_mb": mem, "peak_memory_kind": "max allocated (CUDA)" if device.type == "cuda" else "peak RSS"}
    log(f"benchmark on {res['device']} ({res['threads']} threads, population {res['population']}): "
        f"B={cfg.batch_size} N={cfg.num_inner_models} T={cfg.inner_steps}\n"
        f"  median {med:.4f} s/meta-step (min {times[0]:.4f}, max {times[-1]:.4f}, {len(times)} steps after 3 warm-up)\n"
        f"  {res['inner_samples_per_s']:.0f} inner samples/s, {res['gflop_per_step']:.1f} GFLOP/step, "
        f"{res['achieved_gflops']:.1f} GFLOP/s achieved\n"
        f"  peak memory {mem:.0f} MB ({res['peak_memory_kind']})")
    return res


# =============================================================================================
# Figures (matplotlib is imported here only)
# =============================================================================================

def draw_figures(run_dirs, out_dir):
    """Three PNGs from finished runs' files: score-vs-corruption panels, training curves, downstream."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = []
    for d in map(Path, run_dirs):
        if not (d / "metrics.json").is_file():
            raise UsageError(f"--figures: {d} has no metrics.json (not a finished run)")
        runs.append((d, json.loads((d / "metrics.json").read_text()), json.loads((d / "config.json").read_text())))
    d = runs[0][0]
    rows = [line.split(",") for line in (d / "eval_scores.csv").read_text().splitlines()[1:]]
    by_step = {}
    for s, f, v in rows:
        by_step.setdefault(int(s), ([], []))
        by_step[int(s)][0].append(float(f))
        by_step[int(s)][1].append(float(v))
    steps = sorted(by_step)
    pick = [steps[round(i * (len(steps) - 1) / 9)] for i in range(10)] if len(steps) >= 10 else steps
    pick = sorted(set(pick))
    fig, axes = plt.subplots(2, 5, figsize=(15, 6.2), sharex=True)
    for ax, s in zip(axes.flat, pick):
        f, v = torch.tensor(by_step[s][0]), torch.tensor(by_step[s][1])
        slope = pearson(f, v) * v.std() / f.std()
        ax.scatter(f, v, s=3, alpha=0.35, color="tab:blue")
        xs = torch.linspace(0, 1, 2)
        ax.plot(xs, v.mean() + slope * (xs - f.mean()), color="tab:red", lw=1.5)
        title = (f"R$^2$ {pearson(f, v) ** 2:.2f}, $\\rho$ {spearman(f, v):+.2f}" if v.std() > 0
                 else "all scores equal")
        ax.set_title(f"step {s}: {title}", fontsize=9)
    for ax in axes.flat[len(pick):]:
        ax.axis("off")
    for ax in axes[1]:
        ax.set_xlabel("corruption fraction f")
    for ax in axes[:, 0]:
        ax.set_ylabel("rater score")
    fig.suptitle(f"Rater score vs corruption of held-out test images ({d.name}, 1000 images per panel)")
    fig.tight_layout()
    fig.savefig(out_dir / "score_vs_corruption.png", dpi=80)
    plt.close(fig)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8))
    for d, m, _ in runs:
        loss = [float(line.split(",")[1]) for line in (d / "outer_loss.csv").read_text().splitlines()[1:]]
        w = 20
        smooth = [sum(loss[max(0, i - w + 1):i + 1]) / len(loss[max(0, i - w + 1):i + 1]) for i in range(len(loss))]
        a1.plot(range(1, len(loss) + 1), smooth, label=d.name)
        ev = m["eval"]
        a2.plot([e["step"] for e in ev], [e["spearman"] for e in ev], "o-", label=f"{d.name}: Spearman rho")
        a2.plot([e["step"] for e in ev], [e["auroc"] for e in ev], "s--", label=f"{d.name}: AUROC")
    a1.set(xlabel="meta-step", ylabel="outer loss (20-step mean)", title="Outer (validation) loss")
    a2.set(xlabel="meta-step", title="Rater quality: test Spearman rho, train AUROC")
    a2.axhline(0, color="gray", lw=0.5)
    a1.legend(fontsize=8)
    a2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "training_curves.png", dpi=80)
    plt.close(fig)

    with_ds = [(d, json.loads((d / "downstream.json").read_text())) for d, _, _ in runs if (d / "downstream.json").is_file()]
    if with_ds:
        fig, axes = plt.subplots(1, len(with_ds), figsize=(5.5 * len(with_ds), 3.8), squeeze=False)
        for ax, (d, ds) in zip(axes[0], with_ds):
            mus = [ds["summary"][m]["mean"] for m in DOWNSTREAM_METHODS]
            sds = [ds["summary"][m]["std"] for m in DOWNSTREAM_METHODS]
            ax.bar(range(4), mus, yerr=sds, capsize=4, color=["gray", "tab:green", "tab:orange", "tab:purple"])
            for i, m in enumerate(DOWNSTREAM_METHODS):
                ax.scatter([i] * len(ds["accuracy"][m]), ds["accuracy"][m], color="k", s=8, zorder=3)
            ax.set_xticks(range(4), ["baseline", "filtered", "random", "oracle*"])
            lo = min(min(ds["accuracy"][m]) for m in DOWNSTREAM_METHODS)
            hi = max(max(ds["accuracy"][m]) for m in DOWNSTREAM_METHODS)
            ax.set_ylim(lo - 0.3 * (hi - lo + 1e-3), hi + 0.3 * (hi - lo + 1e-3))
            ax.set(ylabel="clean test accuracy", title=f"{d.name} (rho={ds['discard_fraction']})")
        fig.text(0.01, 0.01, "* oracle uses the ground truth (an upper bound); bars: mean +- std over seeds",
                 fontsize=7)
        fig.tight_layout(rect=(0, 0.04, 1, 1))
        fig.savefig(out_dir / "downstream.png", dpi=80)
        plt.close(fig)


# =============================================================================================
# main
# =============================================================================================

def run(cfg, log=print):
    if cfg.figures:
        draw_figures(cfg.figures, cfg.out_dir)
        return 0
    if cfg.benchmark:
        benchmark(cfg, log)
        return 0
    device = torch.device(cfg.device)
    rater = load_rater(cfg, device) if cfg.load_checkpoint else None
    if not (cfg.eval_only or cfg.downstream_only):
        prepare_out_dir(cfg)
    data = make_data(cfg)
    if cfg.eval_only:
        print(json.dumps(evaluate_rater(rater, data, cfg, device), indent=2))
        return 0
    out = Path(cfg.out_dir)
    if not cfg.downstream_only:
        t0 = time.perf_counter()
        rater, metrics = train(cfg, data, log)
        metrics["wall_seconds"] = time.perf_counter() - t0
        atomic_write_text(json.dumps(metrics, indent=2), out / "metrics.json")
        f = metrics["final"]
        log(f"final: Spearman {f['spearman']:+.4f} (best {metrics['best_spearman']:+.4f}), R^2 {f['pearson_r2']:.4f}, "
            f"AUROC {f['auroc']:.4f}, precision@{cfg.discard_fraction:g} {f['precision_at_rho']:.4f}")
    if not cfg.skip_downstream or cfg.downstream_only:
        out.mkdir(parents=True, exist_ok=True)
        ds = run_downstream(rater, data, cfg, device, log)
        atomic_write_text(json.dumps(ds, indent=2), out / "downstream.json")
        md = downstream_markdown(ds, vars(cfg))
        atomic_write_text(md, out / "downstream.md")
        log(md)
    return 0


def main(argv=None):
    try:
        cfg = parse_args(argv)
        return run(cfg)
    except UsageError as e:
        print(f"datarater.py: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"datarater.py: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except OSError as e:
        print(f"datarater.py: error: cannot write {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
