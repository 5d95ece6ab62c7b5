"""Experiment `training`: a CNN on Fashion-MNIST on 4 real Horovod ranks, ten gradient compression setups of
the seeds, then the optimizers people use (SGD with momentum, AdamW on a small vision transformer).

The first seed's Fig. 3 (4 compression operators, training/test loss and accuracy on 4 nodes) and the second
seed's experiment (DoubleSqueeze against uncompressed SGD and compressed SGD without error compensation,
convergence and per-epoch time), on a small LeNet-like CNN instead of VGG19 / ResNet-18 on CIFAR-10.

The seeds' configurations (all plain SGD, no momentum, same seed, same initial weights, same data order):

    none                         Horovod's own dense fp32 allreduce (hvd_compress not used)
    Top-k 1% (no EF)             topk:0.01, compressed SGD without error compensation
    MEM-SGD: Top-k 1% + EF       topk:0.01 with worker error feedback
    DoubleSqueeze Top-k 1%       topk:0.01 + EF on workers, Top-k 1% + EF server pass on the root
    DoubleSqueeze 1-bit          onebit + EF on workers and server
    QSGD 16 levels               qsgd:16, unbiased, no EF
  the 4 operators of the first seed's Fig. 3 (our choice, 5% so that the sparsifiers keep enough coordinates
  of a small model): Top-k 5% + EF (biased), Rand-k 5% (unbiased, scaled by d/k, no EF: the unbiased
  counterpart at the same k), natural compression (unbiased), and the seed's new composition Top-k 5% then
  natural compression + EF.

The optimizers people use (issue 13): SGD with momentum 0.9 on the same CNN, dense, Top-k 1% + EF with the
momentum left in the optimizer (what a user tries first), and with Deep Gradient Compression's recipe (momentum
correction and factor masking, a warm-up of the ratio, small tensors dense), also under DoubleSqueeze, and without
the factor masking, also with Nesterov's momentum (and dense with it); AdamW on a small vision transformer, dense
and Top-k 1% + EF, with and without the warm-up, with 1-bit Adam's recipe (uncompressed first steps, then AdamW's
second moment frozen: ``hvd_compress.torch.FrozenVarianceAdamW``), and with Adam's first moment compressed in the
gradient's place (momentum correction without masking: ``hvd_compress.torch.MomentumCorrectedAdamW``).

All configurations run in ONE 4-rank mpirun launch (training_worker.py), taking turns step by step on the same
batches, so that load from other jobs falls on every configuration's per-epoch time alike. Checks: every
configuration trains (final test accuracy well above chance), the 4 replicas are bit-identical at the end,
error feedback beats Top-k without it, bytes on the wire are what the compressors' wire formats say (Top-k 1%
about 2% of dense fp32, DoubleSqueeze about twice that on the root). The orderings the seeds report (Top-k
over Rand-k, Top-k + natural the most communication-efficient, DoubleSqueeze as good as uncompressed, faster
epochs) and the gaps of the optimizers' configurations to their dense run are measured and written to the
summary's "findings", not asserted: on a small run they can flip by noise, and per-epoch time here is on
shared CPU cores with shared-memory transport, not a network.
"""
import json
import os
import shutil
import subprocess
import sys
import time

import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

from hvd_compress import compressors as C

from .common import ROOT, progress, relpath, save

WORKER = "scripts.experiments.training_worker"   # run as a module from ROOT
RANKS = 4


def spec(compressor, error_feedback=False, server=None, optimizer="sgd", lr=None, momentum=0.0, model="cnn",
         momentum_correction=False, warmup=0, dense_below=0, momentum_masking=True, nesterov=False,
         transport=None):
    """A configuration: the Compression's arguments and the optimizer it trains with (lr None: the setup's)."""
    return dict(compressor=compressor, error_feedback=error_feedback, server=server, optimizer=optimizer, lr=lr,
                momentum=momentum, weight_decay=0.01, model=model, momentum_correction=momentum_correction,
                momentum_masking=momentum_masking, nesterov=nesterov, warmup=warmup, clip=0.0,
                dense_below=dense_below, transport=transport)


SGDM = dict(lr=0.01, momentum=0.9)   # the same effective step, lr / (1 - momentum), as plain SGD's 0.1
# Deep Gradient Compression's recipe: momentum correction, a warm-up from 25% over 50 steps, tensors under 256
# elements dense (the biases: 0.2% of the CNN); together 0.9% more of the dense bytes on the full run (measured)
DGC = dict(momentum_correction=True, warmup=50, dense_below=256)
ADAMW = dict(optimizer="adamw", lr=1e-3, model="vit")   # its tensors under 256 elements are 2.3% of it
FROZEN_V = {**ADAMW, "optimizer": "adamw-frozen-v"}
# the same with Adam's first moment compressed in the gradient's place (momentum correction without factor
# masking, beta1 = 0.9): hvd_compress.torch.MomentumCorrectedAdamW
MOMENTUM_ADAMW = {**ADAMW, "optimizer": "adamw-momentum", "momentum": 0.9, "momentum_correction": True,
                  "momentum_masking": False}
CONFIGS = {
    "none (dense fp32)": spec("none"),
    "Top-k 1% (no EF)": spec("topk:0.01"),
    "MEM-SGD: Top-k 1% + EF": spec("topk:0.01", True),
    "DoubleSqueeze Top-k 1%": spec("topk:0.01", True, "topk:0.01"),
    "DoubleSqueeze 1-bit": spec("onebit", True, "onebit"),
    "QSGD 16 levels": spec("qsgd:16"),
    "Top-k 5% + EF": spec("topk:0.05", True),
    "Rand-k 5% (unbiased)": spec("randk:0.05"),
    "natural (unbiased)": spec("natural"),
    "Top-k 5% + natural + EF": spec("topk:0.05+natural", True),
    "SGD-m: none (dense fp32)": spec("none", **SGDM),
    "SGD-m: Top-k 1% + EF": spec("topk:0.01", True, **SGDM),
    "SGD-m: Top-k 1% + EF + DGC recipe": spec("topk:0.01", True, **SGDM, **DGC),
    "SGD-m: DoubleSqueeze Top-k 1% + DGC recipe": spec("topk:0.01", True, "topk:0.01", **SGDM, **DGC),
    "SGD-m: Top-k 1% + EF + DGC recipe without factor masking": spec("topk:0.01", True, **SGDM, **DGC,
                                                                     momentum_masking=False),
    "SGD-m: none (dense fp32), Nesterov": spec("none", **SGDM, nesterov=True),
    "SGD-m: Top-k 1% + EF + DGC recipe without factor masking, Nesterov":
        spec("topk:0.01", True, **SGDM, **DGC, momentum_masking=False, nesterov=True),
    "SGD-m: DoubleSqueeze Top-k 1% + DGC recipe without factor masking, Nesterov":
        spec("topk:0.01", True, "topk:0.01", **SGDM, **DGC, momentum_masking=False, nesterov=True),
    "AdamW ViT: none (dense fp32)": spec("none", **ADAMW),
    "AdamW ViT: Top-k 1% + EF": spec("topk:0.01", True, **ADAMW),
    "AdamW ViT: Top-k 1% + EF + warm-up": spec("topk:0.01", True, **ADAMW, warmup=50),
    # 1-bit Adam's recipe: uncompressed for the first 1% of the steps (what 3% of the dense bytes allows), then
    # Top-k 1% + EF with AdamW's second moment frozen; and with 10% of the steps uncompressed
    "AdamW ViT: Top-k 1% + EF, 1% dense then v frozen": spec("topk:0.01", True, **FROZEN_V, warmup=[0.01, "dense"]),
    "AdamW ViT: Top-k 1% + EF, 10% dense then v frozen": spec("topk:0.01", True, **FROZEN_V, warmup=[0.1, "dense"]),
    "AdamW ViT: Top-k 1% of the first moment + EF, 1% dense then v frozen":
        spec("topk:0.01", True, **MOMENTUM_ADAMW, warmup=[0.01, "dense"]),
}
(NONE, TOPK, EF, DS_TOPK, DS_ONEBIT, QSGD, TOPK5, RANDK5, NATURAL, TOPK5_NAT,
 M_NONE, M_EF, M_DGC, M_DS_DGC, M_UNMASKED, M_NONE_NESTEROV, M_NESTEROV, M_DS_NESTEROV,
 A_NONE, A_EF, A_WARM, A_FROZEN1, A_FROZEN10, A_MOMENTUM) = CONFIGS
SEEDS = list(CONFIGS)[:10]
GROUPS = {  # the plots: the seeds' configurations, then each seed's set, then the optimizers'
    "all": SEEDS,
    "doublesqueeze": [NONE, TOPK, EF, DS_TOPK, DS_ONEBIT, QSGD],
    "fig3": [NONE, TOPK5, RANDK5, NATURAL, TOPK5_NAT],
    "momentum": [M_NONE, M_EF, M_DGC, M_DS_DGC, M_UNMASKED, M_NONE_NESTEROV, M_NESTEROV, M_DS_NESTEROV],
    "adamw": [A_NONE, A_EF, A_WARM, A_FROZEN1, A_FROZEN10, A_MOMENTUM],
}
SETUP = {  # quick: tiny models, 2048 examples, few steps (each step is several collectives); full: wider, 20000
    True: {"epochs": 6, "batch_size": 32, "lr": 0.15, "seed": 42, "train_limit": 2048, "test_limit": 1000,
           "width": 8, "vit_dim": 16},
    False: {"epochs": 6, "batch_size": 32, "lr": 0.1, "seed": 42, "train_limit": 20000, "test_limit": 10000,
            "width": 16, "vit_dim": 64},
}
TRAINS_ABOVE = 0.3   # 3 x chance (0.1)


def launch_worker(tmp, cfg, quick):
    """The worker on 4 ranks under mpirun; returns its report {"runs": {label: run}}."""
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        raise SystemExit("mpirun not found: install OpenMPI (bash scripts/setup.sh does)")
    config, out = tmp / "config.json", tmp / "report.json"
    configs = {label: {**c, "lr": c["lr"] or cfg["lr"]} for label, c in CONFIGS.items()}
    config.write_text(json.dumps({**cfg, "configs": configs}))
    cmd = [mpirun, "--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "-np", str(RANKS),
           sys.executable, "-m", WORKER, str(config), str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    with progress(range(len(CONFIGS) * cfg["epochs"]), quick, desc=f"training: epochs on {RANKS} ranks") as bar:
        for line in proc.stdout:
            lines.append(line)
            if line.rstrip().endswith(" done"):
                bar.update()
    if proc.wait() != 0 or not out.exists():
        raise SystemExit(f"the {RANKS}-rank worker failed (exit {proc.returncode}):\n{''.join(lines)[-5000:]}")
    return json.loads(out.read_text())


CONTROL_BYTES = 5   # per compressed tensor and step: the step marker (float32) and the finiteness flag (uint8)


def payload_bytes_per_step(config, sizes):
    """Bytes rank 0 sends per step by the wire formats (the root also broadcasts the server's payload; tensors
    under dense_below elements travel dense), with hvd_compress's control bytes. After the warm-up, if any."""
    if config["compressor"] == "none" and config["server"] is None:
        return sum(4 * d for d in sizes)
    worker, server = C.parse(config["compressor"]), C.parse(config["server"])
    return sum(4 * d if d < config["dense_below"] else
               worker.wire_bytes(d) + (server.wire_bytes(d) if server else 0) + CONTROL_BYTES for d in sizes)


def analyse(report):
    table = {}
    for label, r in report["runs"].items():
        last, recs = r["records"][-1], r["records"]
        steps = r["steps_per_epoch"] * len(recs)
        expected = payload_bytes_per_step(CONFIGS[label], r["param_sizes"].values()) * steps
        times = [rec["time_s"] for rec in recs]
        table[label] = {"final_test_acc": last["test_acc"], "final_test_loss": last["test_loss"],
                        "final_train_loss": last["train_loss"], "best_test_acc": max(x["test_acc"] for x in recs),
                        "bytes_sent": last["bytes_sent"], "dense_bytes": last["dense_bytes"],
                        "bytes_ratio": last["bytes_sent"] / last["dense_bytes"],
                        "payload_bytes_by_wire_format": expected,
                        "bytes_over_wire_format": last["bytes_sent"] / expected,
                        "mean_epoch_s": sum(times) / len(times), "epochs_done": len(recs),
                        "replicas_identical": r["replicas_identical"], "failed": r["failed"]}
    return table


def plot_curves(runs, labels, title, path):
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    panels = [("train_loss", "training loss (mean over the epoch's minibatches)"), ("test_loss", "test loss"),
              ("test_acc", "test accuracy")]
    for i, label in enumerate(labels):
        recs = runs[label]["records"]
        style = dict(color=f"C{list(CONFIGS).index(label)}", marker="o", ms=3, label=label)   # same color everywhere
        epochs = [r["epoch"] for r in recs]
        for ax, (key, name) in zip(axes.ravel(), panels):
            ax.plot(epochs, [r[key] for r in recs], **style)
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel(name)
        axes[1, 1].semilogx([r["bytes_sent"] for r in recs], [r["test_acc"] for r in recs], **style)
    axes[1, 1].set_xlabel("bytes sent by rank 0 (cumulative)")
    axes[1, 1].set_ylabel("test accuracy")
    axes[0, 0].set_yscale("log")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return save(fig, path)


def plot_time(table, path):
    labels = list(table)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 1.5 + 0.3 * len(labels)))
    y = range(len(labels))
    ax.barh(y, [table[k]["mean_epoch_s"] for k in labels], color=[f"C{i}" for i in y])
    ax.set_yticks(list(y), labels)
    ax.invert_yaxis()
    ax.set_xlabel("mean training time per epoch (s, rank 0)")
    ax2.barh(y, [table[k]["bytes_ratio"] for k in labels], color=[f"C{i}" for i in y])
    ax2.set_yticks(list(y), [])
    ax2.invert_yaxis()
    ax2.set_xscale("log")
    ax2.set_xlabel("bytes sent by rank 0 / dense fp32 bytes")
    for i, k in enumerate(labels):
        ax2.text(table[k]["bytes_ratio"], i, f" {table[k]['bytes_ratio']:.4f}", va="center", fontsize=8)
    fig.suptitle(f"per-epoch time and bytes, {RANKS} ranks on shared CPU cores (shared-memory transport)")
    fig.tight_layout()
    return save(fig, path)


def acc_within(records, budget):
    """Test accuracy at the last evaluated epoch whose cumulative bytes fit in ``budget`` (None if none does)."""
    fits = [r["test_acc"] for r in records if r["bytes_sent"] <= budget]
    return fits[-1] if fits else None


def findings_of(table, runs):
    """The orderings the seeds report, measured (held or not)."""
    acc = {k: v["final_test_acc"] for k, v in table.items()}
    t = {k: v["mean_epoch_s"] for k, v in table.items()}
    ratio = {k: v["bytes_ratio"] for k, v in table.items()}
    out = {}
    out["doublesqueeze_vs_compressed_sgd"] = (
        f"DoubleSqueeze Top-k 1% reaches {acc[DS_TOPK]:.4f} against {acc[TOPK]:.4f} for Top-k 1% without error "
        f"compensation ({'better' if acc[DS_TOPK] > acc[TOPK] else 'not better'}, as the second seed reports "
        f"better)")
    gap = max(abs(acc[NONE] - acc[DS_TOPK]), abs(acc[NONE] - acc[DS_ONEBIT]))
    out["doublesqueeze_vs_uncompressed"] = (
        f"DoubleSqueeze Top-k 1% / 1-bit reach {acc[DS_TOPK]:.4f} / {acc[DS_ONEBIT]:.4f} against {acc[NONE]:.4f} "
        f"uncompressed (largest gap {gap:.4f}) and {acc[EF]:.4f} for MEM-SGD (worker EF only)")
    out["qsgd"] = f"QSGD 16 levels reaches {acc[QSGD]:.4f} (uncompressed {acc[NONE]:.4f})"
    out["topk_vs_randk"] = (
        f"Top-k 5% + EF reaches {acc[TOPK5]:.4f}, Rand-k 5% (unbiased) {acc[RANDK5]:.4f}: Top-k "
        f"{'ahead' if acc[TOPK5] > acc[RANDK5] else 'not ahead'} at the same bytes, as the first seed reports ahead")
    out["topk_natural_efficiency"] = (
        f"Top-k 5% + natural + EF reaches {acc[TOPK5_NAT]:.4f} with bytes ratio {ratio[TOPK5_NAT]:.4f}, against "
        f"Top-k 5% + EF {acc[TOPK5]:.4f} at {ratio[TOPK5]:.4f}, natural {acc[NATURAL]:.4f} at {ratio[NATURAL]:.4f}, "
        f"Rand-k 5% {acc[RANDK5]:.4f} at {ratio[RANDK5]:.4f}: the fewest bytes of the four; accuracy per byte "
        + ("highest" if all(acc[TOPK5_NAT] / ratio[TOPK5_NAT] >= acc[k] / ratio[k] for k in (TOPK5, RANDK5, NATURAL))
           else "not highest") + " of the four, as the first seed reports")
    budget = table[TOPK5_NAT]["bytes_sent"]
    at_budget = {k: acc_within(runs[k]["records"], budget) for k in (TOPK5, RANDK5, NATURAL)}
    out["fig3_same_bytes"] = (
        f"within the {budget / 1e6:.1f} MB Top-k 5% + natural + EF sends in all (final accuracy {acc[TOPK5_NAT]:.4f}), "
        "the others had reached (last epoch within that budget): "
        + ", ".join(f"{k} {'no epoch' if a is None else f'{a:.4f}'}" for k, a in at_budget.items())
        + ("; Top-k + natural highest" if all(a is None or a < acc[TOPK5_NAT] for a in at_budget.values())
           else "; Top-k + natural not highest"))
    for name, dense, runs_of in (("sgd_momentum", M_NONE, (M_EF, M_DGC, M_DS_DGC, M_UNMASKED, M_NESTEROV,
                                                           M_DS_NESTEROV)),
                                 ("sgd_nesterov", M_NONE_NESTEROV, (M_NESTEROV,)),
                                 ("adamw", A_NONE, (A_EF, A_WARM, A_FROZEN1, A_FROZEN10, A_MOMENTUM))):
        out[name] = (f"dense {acc[dense]:.4f}; " + "; ".join(
            f"{k} {acc[k]:.4f} ({100 * (acc[dense] - acc[k]):+.2f} points below dense) at {ratio[k]:.4f} of "
            f"the dense bytes" for k in runs_of))
    faster = [k for k in SEEDS if k != NONE and t[k] < t[NONE]]
    out["per_epoch_time"] = (
        f"mean epoch time: uncompressed {t[NONE]:.2f} s, DoubleSqueeze Top-k {t[DS_TOPK]:.2f} s, DoubleSqueeze 1-bit "
        f"{t[DS_ONEBIT]:.2f} s, MEM-SGD {t[EF]:.2f} s; faster than uncompressed: {faster or 'none'} (the second "
        f"seed reports compressed epochs faster on a network; here ranks share CPU cores and memory, so "
        f"communication is nearly free and compression can only add time)")
    return out


def run(out, quick):
    cfg = SETUP[quick]
    tmp = out / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    start, load_before = time.time(), os.getloadavg()
    report = launch_worker(tmp, cfg, quick)
    horovod_s = time.time() - start
    load = {"cpu_cores": os.cpu_count(), "loadavg_1min_before": load_before[0],  # timings depend on other jobs
            "loadavg_1min_after": os.getloadavg()[0], "loadavg_15min_after": os.getloadavg()[2]}
    shutil.rmtree(tmp)
    runs = report["runs"]
    table = analyse(report)

    checks = {
        f"every_configuration_trains_final_test_acc_above_{TRAINS_ABOVE}":
            all(v["final_test_acc"] > TRAINS_ABOVE and not v["failed"] and v["epochs_done"] == cfg["epochs"]
                for v in table.values()),
        f"replicas_bit_identical_on_{RANKS}_ranks": all(v["replicas_identical"] for v in table.values()),
        "error_feedback_beats_topk_without_ef": (table[EF]["final_test_acc"] > table[TOPK]["final_test_acc"]
                                                 and table[EF]["final_train_loss"] < table[TOPK]["final_train_loss"]),
        # payloads by the wire formats and hvd_compress's control bytes, exactly (a warm-up sends more)
        "bytes_sent_match_wire_formats": all(v["bytes_sent"] == v["payload_bytes_by_wire_format"]
                                             for k, v in table.items() if not CONFIGS[k]["warmup"]),
        # 6 bytes per kept fp32 value (a 2-byte index; 8 before 2026-12-05, when this read "about 2%")
        "topk_1pct_sends_about_1.5pct_of_dense": 0.015 <= table[TOPK]["bytes_ratio"] < 0.0225,
        "doublesqueeze_root_sends_about_twice_topk":
            1.9 < table[DS_TOPK]["bytes_ratio"] / table[TOPK]["bytes_ratio"] < 2.1,
    }
    findings = findings_of(table, runs)
    figures = {
        "all": plot_curves(runs, GROUPS["all"], f"Fashion-MNIST CNN, {RANKS} Horovod ranks: every configuration",
                           out / "curves_all.png"),
        "doublesqueeze": plot_curves(runs, GROUPS["doublesqueeze"], "DoubleSqueeze, MEM-SGD, compressed SGD, "
                                     "QSGD against uncompressed", out / "curves_doublesqueeze.png"),
        "fig3": plot_curves(runs, GROUPS["fig3"], "the first seed's Fig. 3 operators (5%) against uncompressed",
                            out / "curves_fig3.png"),
        "momentum": plot_curves(runs, GROUPS["momentum"], "SGD with momentum 0.9: Top-k 1% + EF, with and "
                                "without Deep Gradient Compression's recipe", out / "curves_momentum.png"),
        "adamw": plot_curves(runs, GROUPS["adamw"], "AdamW on a small vision transformer: Top-k 1% + EF",
                             out / "curves_adamw.png"),
        "epoch_time": plot_time(table, out / "epoch_time.png"),
    }
    first, w, vit = runs[NONE], cfg["width"], runs[A_NONE]
    summary = {
        "setup": {**cfg, "ranks": RANKS, "params": first["params"], "vit_params": vit["params"],
                  "steps_per_epoch": first["steps_per_epoch"],
                  "model": f"conv5x5({w}) pool conv5x5({2 * w}) pool fc({8 * w}) fc(10)",
                  "vit": f"7x7 patches, dim {cfg['vit_dim']}, 2 pre-norm blocks of 4 heads, class token",
                  "optimizer": "SGD (the seeds' configurations: no momentum), SGD with momentum or AdamW as each "
                               "configuration says, stock hvd.DistributedOptimizer",
                  "launcher": f"mpirun -np {RANKS}, all configurations in one launch, interleaved step by step",
                  "configs": {k: {**c, "lr": c["lr"] or cfg["lr"]} for k, c in CONFIGS.items()}},
        "table": table,
        "findings": findings,
        "finding": " ".join(f"{v}." for v in findings.values()),
        "runs": {k: v["records"] for k, v in runs.items()},
        "horovod_seconds": horovod_s,
        "machine_load": load,
        "checks": checks,
        "figures": {k: relpath(v) for k, v in figures.items()},
    }
    return summary, all(checks.values())
