"""One-off: the bytes benchmark's worker on 8 ranks (mpirun --oversubscribe), for the sharded transport's scaling:
sharded vs allgather DoubleSqueeze Top-k 1% and dense. Reuses scripts/benchmarks/bytes.py (launch, analyse).

    OMP_NUM_THREADS=1 .venv/bin/python -m scripts.benchmarks.bytes_8ranks     # ~15 s; writes results/bench/bytes8.json
"""
import json, tempfile, time
from pathlib import Path
from . import bytes as B
from ..experiments.common import ROOT, commit, write_json
cfgs = [{"compressor": "dense", "mode": "-", "transport": "allreduce", "builtin": True},
        {"compressor": "topk:0.01", "mode": "doublesqueeze", "transport": "sharded", "builtin": False},
        {"compressor": "topk:0.01", "mode": "doublesqueeze", "transport": "allgather", "builtin": True}]
cfg = B.CONFIG[False]
start = time.time()
with tempfile.TemporaryDirectory() as tmp:
    p = Path(tmp) / "configs.json"; p.write_text(json.dumps(cfgs))
    rows, skipped, dense = B.analyse(B.launch(8, p, Path(tmp) / "report8.json", cfg))
print(B.table(rows))
write_json(ROOT / "results" / "bench" / "bytes8.json", {"benchmark": "bytes (8 ranks, one-off)", "ranks": 8,
           "launcher": "mpirun --allow-run-as-root --oversubscribe --bind-to none -np 8", "configs": cfgs,
           "warmup_steps": cfg["warmup"], "counted_steps": cfg["counted"], "dense_bytes": dense, "rows": rows,
           "skipped": skipped, "commit": commit(), "runtime_s": round(time.time() - start, 1)})
