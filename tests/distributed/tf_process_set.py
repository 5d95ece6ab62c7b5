"""Run with mpirun on 3 ranks: the TensorFlow Compression on a 2-of-3 process set (ranks 1 and 2; rank 0 stays
out), with hvd.DistributedGradientTape(process_set=...).

usage: tf_process_set.py CASES_JSON OUT_DIR
Ranks 1 and 2 train every case (the root of the server pass is the set's first rank, global rank 1) and save
their variables and the case's state_dict() sizes (OUT_DIR/rank{r}.pkl); then a Compression on all ranks used
by a tape on the pair must be refused, not hang. Rank 0 prints "RESULT <json>".
"""
import json
import os
import pickle
import sys

sys.path.insert(0, os.path.dirname(__file__))
from tf_common import make_variables, names_of, train_distributed  # noqa: E402

import horovod.tensorflow as hvd  # noqa: E402
import tensorflow as tf  # noqa: E402

import hvd_compress.tensorflow as htc  # noqa: E402


def main(cases_path, out_dir):
    pair, alone = hvd.ProcessSet([1, 2]), hvd.ProcessSet([0])
    hvd.init(process_sets=[pair, alone])
    tf.config.threading.set_intra_op_parallelism_threads(1)
    refused = run_on_the_pair(cases_path, out_dir, pair) if pair.included() else None
    # rank 0 waits here: a rank that leaves early shuts Horovod down for the others
    refused = hvd.broadcast_object(refused, root_rank=1, name="refused")
    if hvd.rank() == 0:
        print("RESULT " + json.dumps({"refused": refused}), flush=True)


def run_on_the_pair(cases_path, out_dir, pair):
    results = {}
    for case in json.load(open(cases_path)):
        variables, compression = train_distributed(case, case["steps"], process_set=pair)
        results[case["id"]] = {n: v.numpy() for n, v in zip(names_of(variables), variables)}
        state = compression.state_dict()
        results[case["id"]]["_state"] = {"size": state["size"], "workers": len(state["worker_error"])}
    with open(os.path.join(out_dir, f"rank{hvd.rank()}.pkl"), "wb") as f:
        pickle.dump(results, f)
    variables = make_variables()
    try:   # a Compression for all ranks would wait for rank 0 in its collectives: refused at the first step
        compression = htc.Compression("topk:0.3", variables=variables, process_set=hvd.global_process_set,
                                      dense_below=0)
        train_distributed({"compressor": "topk:0.3"}, 1, variables=variables, compression=compression,
                          process_set=pair)
        return "not refused"
    except ValueError as err:
        return str(err)

if __name__ == "__main__":
    main(*sys.argv[1:])
