"""Helpers shared by the experiments: paths, JSON that survives inf/NaN, figures, progress bars."""
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tqdm import tqdm  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


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
