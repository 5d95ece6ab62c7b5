"""Experiment `variance`: the empirical variance ||C(x) - x||^2 / ||x||^2 of real gradients (first seed, Fig. 1).

The poster compares, during the training of ResNet18, GoogLeNet and VGG19 on CIFAR10, two pairs of compressors
applied to the actual gradients: deterministic (biased) against unbiased natural compression, and Top-k against
Rand-k with k = d/5; its claim is that the biased member of each pair has the lower empirical variance. Here,
with three CNNs sized to train on a CPU on Fashion-MNIST (from the Debian package, no download):

    ResNet      a 3x3 stem and three residual blocks with BatchNorm (16 -> 32 -> 64 channels), global pooling
    VGG         stacked 3x3 conv + BatchNorm blocks (16, 16, M, 32, 32, M, 64, 64, M), two linear layers
    GoogLeNet   a 3x3 stem and three Inception modules (parallel 1x1 / 1x1-3x3 / 1x1-5x5 / pool-1x1 branches)

each trained with plain, uncompressed SGD (momentum 0.9, batch 64, single process). Every few steps the
minibatch gradient x (p.grad, before the optimizer uses it, in float64) is compressed by the library's
compressors (``hvd_compress.parse``; calling a compressor on a tensor returns C(x)):

    natural:det        deterministic natural compression (nearest power of two), B3(9/8): variance <= 1/9
    natural            unbiased natural compression (stochastic rounding), U(9/8): E variance <= 1/8
    topk:0.2           Top-k, k = floor(d/5), B3(d/k): variance <= 1 - k/d (exactly: it keeps the largest k)
    randk:0.2          unbiased Rand-k (scaled by d/k), U(d/k): E variance = d/k - 1 ~ 4
    randk:0.2,biased   Rand-k without the d/k scaling (reported too), E variance = 1 - k/d

all on the same gradient at the same step. Two ways of applying them are measured: to the flattened whole-model
gradient (d = all parameters, as in the poster), and layer-wise, one call per parameter tensor as a Horovod run
compresses them (variance = sum_l ||C(x_l) - x_l||^2 / sum_l ||x_l||^2; Top-k's bound is then
sum_l (1 - k_l/d_l) ||x_l||^2 / ||x||^2). Random compressors get one seed per (compressor, tensor, step).
"""
import os
import time

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from hvd_compress import parse
from hvd_compress.seeds import call_key

from examples.fmnist_data import load_fashion_mnist

from .common import progress, relpath, save

COMPRESSORS = {   # label -> spec (hvd_compress.parse)
    "natural (det.)": "natural:det",
    "natural (unbiased)": "natural",
    "Top-k": "topk:0.2",
    "Rand-k (unbiased)": "randk:0.2",
    "Rand-k (biased)": "randk:0.2,biased",
}
STYLE = {"natural (det.)": ("C0", "-"), "natural (unbiased)": ("C1", "-"), "Top-k": ("C2", "-"),
         "Rand-k (unbiased)": ("C3", "-"), "Rand-k (biased)": ("C3", ":")}
CONFIG = {True: {"steps": 100, "every": 5, "test_images": 2000},
          False: {"steps": 1200, "every": 10, "test_images": 10000}}
BATCH, LR, MOMENTUM = 64, 0.05, 0.9
MODES = ("whole model", "layer-wise")


# ---- the three CNNs (28 x 28 x 1 inputs, 10 classes) ----------------------------------------------------------

def conv_bn(cin, cout, kernel=3, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class Residual(nn.Module):
    """The basic block of ResNet18: two 3x3 convs with BatchNorm and an identity (or 1x1) shortcut."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.body = nn.Sequential(conv_bn(cin, cout, 3, stride), nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(cout))
        self.shortcut = nn.Sequential() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return F.relu(self.body(x) + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, w=16):
        super().__init__()
        self.net = nn.Sequential(conv_bn(1, w), Residual(w, w, 1), Residual(w, 2 * w, 2), Residual(2 * w, 4 * w, 2),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, 10))

    def forward(self, x):
        return self.net(x)


class VGG(nn.Module):
    def __init__(self, cfg=(16, 16, "M", 32, 32, "M", 64, 64, "M")):
        super().__init__()
        layers, c = [], 1
        for v in cfg:
            layers += [nn.MaxPool2d(2)] if v == "M" else [conv_bn(c, v)]
            c = c if v == "M" else v
        self.net = nn.Sequential(*layers, nn.Flatten(), nn.Linear(c * 3 * 3, 128), nn.ReLU(inplace=True),
                                 nn.Linear(128, 10))

    def forward(self, x):
        return self.net(x)


class Inception(nn.Module):
    """GoogLeNet's module: 1x1, 1x1 -> 3x3, 1x1 -> 5x5 and 3x3 max-pool -> 1x1 branches, concatenated."""

    def __init__(self, cin, c1, c3r, c3, c5r, c5, cp):
        super().__init__()
        self.branches = nn.ModuleList([
            conv_bn(cin, c1, 1), nn.Sequential(conv_bn(cin, c3r, 1), conv_bn(c3r, c3, 3)),
            nn.Sequential(conv_bn(cin, c5r, 1), conv_bn(c5r, c5, 5)),
            nn.Sequential(nn.MaxPool2d(3, 1, 1), conv_bn(cin, cp, 1))])

    def forward(self, x):
        return torch.cat([b(x) for b in self.branches], 1)


class GoogLeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(conv_bn(1, 32), nn.MaxPool2d(2),                       # 14 x 14
                                 Inception(32, 16, 16, 32, 8, 8, 8),                     # 64 channels
                                 Inception(64, 32, 24, 48, 8, 16, 16), nn.MaxPool2d(2),  # 112 channels, 7 x 7
                                 Inception(112, 48, 32, 64, 12, 24, 24),                 # 160 channels
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(160, 10))

    def forward(self, x):
        return self.net(x)


ARCHITECTURES = {"ResNet": ResNet, "VGG": VGG, "GoogLeNet": GoogLeNet}


# ---- measurement -----------------------------------------------------------------------------------------------

def b3_bound(c, d):
    """B3(delta) (``c.classes(d)``): ||C(x) - x||^2 <= (1 - 1/delta) ||x||^2 for every x."""
    return 1 - 1 / c.classes(d)["B3"]["delta"]


def u_bound(c, d):
    """U(zeta): E ||C(x) - x||^2 = E ||C(x)||^2 - ||x||^2 <= (zeta - 1) ||x||^2."""
    return c.classes(d)["U"]["zeta"] - 1


def measure(compressors, grads, names, arch, step):
    """{mode: {label: ||C(x) - x||^2 / ||x||^2}} for this step's gradients, plus Top-k's exact bound per mode."""
    whole = torch.cat(grads)
    out = {mode: {} for mode in MODES}
    for label, c in compressors.items():
        # one seed per (compressor, tensor, step), as hvd_compress.seeds keys a Horovod run's draws
        seed = lambda name: (call_key(0, label, f"{arch}/{name}"), step)
        out["whole model"][label] = float((c(whole, seed=seed("*")) - whole).square().sum() / whole.square().sum())
        err = sum(float((c(g, seed=seed(n)) - g).square().sum()) for g, n in zip(grads, names))
        out["layer-wise"][label] = err / float(whole.square().sum())
    bound = lambda g: b3_bound(compressors["Top-k"], g.numel())   # 1 - k/d
    out["Top-k bound"] = {"whole model": bound(whole), "layer-wise": sum(
        bound(g) * float(g.square().sum()) for g in grads) / float(whole.square().sum())}
    return out


def evaluate(model, images, labels):
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in zip(images.split(1000), labels.split(1000)))
    model.train()
    return correct / len(labels)


def train(arch, data, compressors, config, quick):
    """SGD on Fashion-MNIST, measuring every ``every`` steps (and at the last one)."""
    torch.manual_seed(0)
    model = ARCHITECTURES[arch]()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    (x_train, y_train), (x_test, y_test) = data
    order = np.random.default_rng(0).permutation(len(y_train))
    steps, every = config["steps"], config["every"]
    record = {"steps": [], "loss": [], **{mode: {label: [] for label in compressors} for mode in MODES},
              "Top-k bound": {mode: [] for mode in MODES}}
    losses, start = [], time.time()
    for step in progress(range(steps), quick, desc=f"variance: {arch}"):
        rows = order[step * BATCH % len(order):][:BATCH]
        opt.zero_grad()
        loss = F.cross_entropy(model(x_train[rows]), y_train[rows])
        loss.backward()
        losses.append(loss.item())
        if step % every == 0 or step == steps - 1:
            grads = [p.grad.detach().reshape(-1).double() for _, p in named]
            m = measure(compressors, grads, [n for n, _ in named], arch, step)
            record["steps"].append(step)
            record["loss"].append(float(np.mean(losses[-every:])))
            for mode in MODES:
                for label in compressors:
                    record[mode][label].append(m[mode][label])
                record["Top-k bound"][mode].append(m["Top-k bound"][mode])
        opt.step()
    record.update(params=sum(p.numel() for _, p in named), tensors=len(named), seconds=time.time() - start,
                  final_train_loss=float(np.mean(losses[-50:])), test_accuracy=evaluate(model, x_test, y_test))
    return record


# ---- plots, checks, summary -----------------------------------------------------------------------------------

def plot(records, mode, det_bound, path):
    fig, axes = plt.subplots(1, len(records), figsize=(5 * len(records), 4.2), squeeze=False)
    for ax, (arch, r) in zip(axes[0], records.items()):
        for label, values in r[mode].items():
            color, ls = STYLE[label]
            ax.semilogy(r["steps"], values, color=color, ls=ls, lw=1.3, label=label)
        ax.semilogy(r["steps"], r["Top-k bound"][mode], color="C2", ls="-.", lw=0.9, alpha=0.7,
                    label="Top-k bound 1 − k/d")
        ax.axhline(det_bound, color="C0", ls="-.", lw=0.9, alpha=0.7, label="det. natural bound 1/9")
        ax.set_title(f"{arch} ({r['params']:,} parameters, {mode})", fontsize=10)
        ax.set_xlabel("training step (SGD, batch 64)")
        ax.set_ylabel("‖C(x) − x‖² / ‖x‖²")
    fig.suptitle(f"Empirical variance of compressed Fashion-MNIST gradients, {mode}, k = d/5")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=9, frameon=False)
    return save(fig, path)


def run(out, quick):
    config = CONFIG[quick]
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))   # the CPU is shared: one thread
    start = time.time()
    compressors = {label: parse(spec) for label, spec in COMPRESSORS.items()}
    x_train, y_train = load_fashion_mnist("train")
    x_test, y_test = load_fashion_mnist("test")
    n_test = config["test_images"]
    data = ((torch.from_numpy(x_train), torch.from_numpy(y_train)),
            (torch.from_numpy(x_test[:n_test]), torch.from_numpy(y_test[:n_test])))
    records = {arch: train(arch, data, compressors, config, quick) for arch in ARCHITECTURES}

    # natural compression's constants do not depend on d (Top-k's bound is taken per step, per tensor)
    det_bound = b3_bound(compressors["natural (det.)"], 1)             # 1/9
    unbiased_bound = u_bound(compressors["natural (unbiased)"], 1)     # 1/8
    files = {"whole model": "variance_whole_model.png", "layer-wise": "variance_layerwise.png"}
    figures = {mode: relpath(plot(records, mode, det_bound, out / files[mode])) for mode in MODES}
    table, checks = {}, {}
    for arch, r in records.items():
        modes = {}
        for mode in MODES:
            v = {label: np.array(r[mode][label]) for label in compressors}
            topk_bound = np.array(r["Top-k bound"][mode])
            modes[mode] = {
                "variance": {label: {"mean": x.mean(), "min": x.min(), "max": x.max(), "final": x[-1]}
                             for label, x in v.items()},
                "det_below_unbiased_natural_every_step": bool((v["natural (det.)"] < v["natural (unbiased)"]).all()),
                "topk_below_randk_every_step": bool((v["Top-k"] < v["Rand-k (unbiased)"]).all()),
                "topk_below_biased_randk_every_step": bool((v["Top-k"] < v["Rand-k (biased)"]).all()),
                "topk_within_bound_every_step": bool((v["Top-k"] <= topk_bound + 1e-12).all()),
                "det_natural_within_1/9_every_step": bool((v["natural (det.)"] <= det_bound + 1e-12).all()),
                "unbiased_natural_mean_within_1/8": bool(v["natural (unbiased)"].mean() <= unbiased_bound),
                "ratio_unbiased_to_det_natural_mean": (v["natural (unbiased)"] / v["natural (det.)"]).mean(),
                "ratio_randk_to_topk_mean": (v["Rand-k (unbiased)"] / v["Top-k"]).mean(),
                "topk_bound_mean": topk_bound.mean(),
            }
        table[arch] = {"params": r["params"], "tensors": r["tensors"], "steps": CONFIG[quick]["steps"],
                       "measured_steps": len(r["steps"]), "final_train_loss": r["final_train_loss"],
                       "test_accuracy": r["test_accuracy"], "train_seconds": r["seconds"], **modes}
        both = lambda key: all(modes[mode][key] for mode in MODES)
        # the poster's claim (biased compressors have the lower empirical variance) and the exact B3 bounds,
        # each on the whole-model gradient and layer-wise
        checks[f"{arch}: deterministic natural < unbiased natural at every measured step"] = \
            both("det_below_unbiased_natural_every_step")
        checks[f"{arch}: Top-k < Rand-k (unbiased and biased) at every measured step"] = \
            both("topk_below_randk_every_step") and both("topk_below_biased_randk_every_step")
        checks[f"{arch}: Top-k <= 1 - k/d at every measured step (B3(d/k))"] = both("topk_within_bound_every_step")
        checks[f"{arch}: deterministic natural <= 1/9 at every measured step (B3(9/8))"] = \
            both("det_natural_within_1/9_every_step")
        checks[f"{arch}: unbiased natural's mean <= 1/8 (U(9/8), in expectation)"] = \
            both("unbiased_natural_mean_within_1/8")
    summary = {
        "setup": {**config, "batch": BATCH, "optimizer": f"SGD lr {LR} momentum {MOMENTUM}, uncompressed",
                  "data": "Fashion-MNIST (Debian dataset-fashion-mnist), 60,000 training images, test accuracy on "
                          f"the first {n_test} test images", "compressors": COMPRESSORS,
                  "modes": {"whole model": "one call on the flattened gradient of all parameters",
                            "layer-wise": "one call per parameter tensor (as Horovod compresses), "
                                          "sum of squared errors / squared gradient norm"},
                  "seeds": "(call_key(0, compressor, arch/tensor), step)",
                  "theory": {"natural (det.)": "<= 1/9 for every x (B3(9/8))",
                             "natural (unbiased)": "E <= 1/8 (U(9/8))",
                             "Top-k": "<= 1 - k/d for every x (B3(d/k))",
                             "Rand-k (unbiased)": "E = d/k - 1 (U(d/k))",
                             "Rand-k (biased)": "E = 1 - k/d"},
                  "threads": torch.get_num_threads()},
        "architectures": table,
        "curves": {arch: {k: r[k] for k in ("steps", "loss", *MODES, "Top-k bound")} for arch, r in records.items()},
        "checks": checks,
        "figures": figures,
        "compute_seconds": time.time() - start,
    }
    return summary, all(checks.values())
