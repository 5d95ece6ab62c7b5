"""Run under horovodrun: the TensorFlow plug-in's multi-process scenarios, one TF start-up for all.

usage: tf_worker.py CASES_JSON OUT_DIR
Writes OUT_DIR/rank{r}.npz-like pickles: {case id: {variable name: array}, "_stats": ...}, and runs the
checkpoint scenario for cases marked "checkpoint": true (rank 0 prints "RESULT <json>").
"""
import json
import os
import pickle
import sys

sys.path.insert(0, os.path.dirname(__file__))
from tf_common import compression_of, make_variables, names_of, train_distributed  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import horovod.tensorflow as hvd  # noqa: E402



def checkpoint_matches(case, path):
    """Checkpoint at step 10 (state_dict saved by rank 0, loaded by all) + 10 steps == 20 straight."""
    straight, straight_comp = train_distributed(case, 20)
    first, first_comp = train_distributed(case, 10)
    state = {"variables": [v.numpy() for v in first], "compression": first_comp.state_dict()}
    if hvd.rank() == 0:
        with open(path, "wb") as f:
            pickle.dump(state, f)
    hvd.allreduce(tf.constant(0.0), name="barrier_ckpt")
    with open(path, "rb") as f:
        saved = pickle.load(f)
    variables = make_variables()
    for v, a in zip(variables, saved["variables"]):
        v.assign(a)
    compression = compression_of(case, variables)
    compression.load_state_dict(saved["compression"])
    resumed, resumed_comp = train_distributed(case, 10, start=10, variables=variables, compression=compression)
    a, b = straight_comp.state_dict(), resumed_comp.state_dict()
    return {"parameters_equal": all(np.array_equal(x.numpy(), y.numpy()) for x, y in zip(straight, resumed)),
            "error_buffers_equal": all(np.array_equal(a["worker_error"][r][k], b["worker_error"][r][k])
                                       for r in range(hvd.size()) for k in a["worker_error"][r])
            and all(np.array_equal(a["server_error"][k], b["server_error"][k]) for k in a["server_error"])
            and a["steps"] == b["steps"]}


def main(cases_path, out_dir):
    hvd.init()
    tf.config.threading.set_intra_op_parallelism_threads(1)
    results, report = {}, {}
    for case in json.load(open(cases_path)):
        # "grappler": false turns TensorFlow's graph optimizer off (the step function's first call then takes
        # about a third of the time); functions already built keep theirs
        tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": not case.get("grappler", True)})
        if case.get("checkpoint"):
            report[case["id"]] = checkpoint_matches(case, os.path.join(out_dir, "ckpt.pkl"))
            continue
        variables, compression = train_distributed(case, case["steps"])
        results[case["id"]] = {n: v.numpy() for n, v in zip(names_of(variables), variables)}
        results[case["id"]]["_stats"] = compression.stats()
    with open(os.path.join(out_dir, f"rank{hvd.rank()}.pkl"), "wb") as f:
        pickle.dump(results, f)
    if hvd.rank() == 0:
        print("RESULT " + json.dumps(report), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
