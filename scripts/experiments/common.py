"""Helpers shared by the experiments and benchmarks: paths, the commit measured, JSON that survives inf/NaN,
figures, progress bars."""
import importlib
import json
import math
import subprocess
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tqdm import tqdm  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def commit():
    """The commit measured (+ "-dirty" when hvd_compress/ has uncommitted changes)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "hvd_compress"], cwd=ROOT, capture_output=True,
                               text=True).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except OSError:
        return "unknown"


def clean(obj):
    """obj with non-finite floats as the strings "inf", "-inf", "nan" (strict JSON has no such numbers)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):   # numpy / torch scalars
        return clean(obj.item())
    return obj


def write_json(path, obj):
    Path(path).write_text(json.dumps(clean(obj), indent=2) + "\n")


def save(fig, path):
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return str(path)


def progress(iterable, quick, **kwargs):
    """A tqdm bar in full mode; silent in quick mode (the test suite runs those)."""
    return tqdm(iterable, disable=quick, leave=False, dynamic_ncols=True, **kwargs)


def relpath(path):
    """A path relative to the repository root where it lies inside it (for summaries and READMEs)."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def run_and_report(module_name, kind, name, out, quick, json_path):
    """What reproduce.py and bench.py do with one experiment or benchmark: run ``module.run(out, quick)``,
    write its summary (with ``kind: name``, quick, ok, runtime) to ``json_path``, print the checks, the
    finding if any, and one verdict line; returns ok."""
    start = time.time()
    summary, ok = importlib.import_module(module_name).run(out, quick)
    summary = {kind: name, "quick": quick, "ok": ok, **summary, "runtime_s": round(time.time() - start, 1)}
    write_json(json_path, summary)
    for check, passed in summary.get("checks", {}).items():
        print(f"  [{'ok' if passed else 'FAILED'}] {check}")
    if summary.get("finding"):
        print(f"  {summary['finding']}")
    print(f"{name}{' (quick)' if quick else ''}: {'ok' if ok else 'FAILED'} in {summary['runtime_s']} s; "
          f"{relpath(json_path)}")
    return ok
