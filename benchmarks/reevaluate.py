"""Evaluate a finished run again from its checkpoints and compare with its results.json.

    python benchmarks/reevaluate.py outputs/compare-gowalla/ccd

For every completed stage k, the learner is restored from ``checkpoints/stage_k.pt`` and
every role is evaluated on the test split of each stage j <= k (and on the stage's new users)
with the current code; the script prints the largest change from the stored matrices and
the new LA / RA / H-mean, and ``--write FILE`` saves the new results. A check of the
checkpoints (they must restore the evaluated models) and of changes to the evaluation.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import recbole_ccd  # noqa: E402,F401

from recbole.utils import init_seed  # noqa: E402

from recbole_ccd.compat import load_checkpoint, write_text_atomic  # noqa: E402
from recbole_ccd.config import CCDConfig, validate_stream_config  # noqa: E402
from recbole_ccd.data import build_stages, create_stream_dataset  # noqa: E402
from recbole_ccd.quick_start import INVOCATION_FILE, make_learner  # noqa: E402
from recbole_ccd.trainer.stream import StreamRunner  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir")
    parser.add_argument("--write", default=None,
                        help="a file for the run's results.json with the new results")
    args = parser.parse_args()
    sys.argv = sys.argv[:1]  # RecBole's Config reads --key=value from sys.argv
    warnings.filterwarnings("ignore", module=r"recbole(\.|$)")
    with open(os.path.join(args.output_dir, INVOCATION_FILE), encoding="utf-8") as handle:
        invocation = json.load(handle)
    with open(os.path.join(args.output_dir, "results.json"), encoding="utf-8") as handle:
        stored = json.load(handle)
    config = CCDConfig(model=invocation["model"], dataset=invocation["dataset"],
                       config_dict={**invocation["settings"], "show_progress": False})
    validate_stream_config(config)
    init_seed(config["seed"], config["reproducibility"])
    stages = build_stages(config, create_stream_dataset(config))
    learner = make_learner(config, stages, args.output_dir)
    runner = StreamRunner(config, learner, stages, args.output_dir)
    logging.getLogger().setLevel(logging.WARNING)  # the per-stage tables are not repeated
    start = time.time()
    for k in range(stored["completed_stages"]):
        state = load_checkpoint(os.path.join(args.output_dir, "checkpoints", f"stage_{k}.pt"))
        learner.load_state_dict(state["learner"])
        learner._current = k
        stage_start = time.time()
        runner.evaluate_stage(k)
        print(f"stage {k} re-evaluated in {time.time() - stage_start:.0f} s", flush=True)
    fresh = runner.results.to_dict()
    for role, body in fresh.items():
        for metric, matrix in body["matrix"].items():
            old = stored["results"][role]["matrix"][metric]
            worst = max(abs(a - b) for row, old_row in zip(matrix, old)
                        for a, b in zip(row, old_row) if a is not None)
            summary = "" if body["H-mean"][metric] is None else (
                f"  now LA {body['LA'][metric]:.4f} RA {body['RA'][metric]:.4f} "
                f"H-mean {body['H-mean'][metric]:.4f}")
            print(f"{role:>8} {metric:>10}: largest change {worst:.2e}{summary}")
    if args.write:
        write_text_atomic(json.dumps({**stored, "results": fresh}, indent=2), args.write)
        print(f"written to {args.write}")
    print(f"{time.time() - start:.0f} s in all")


if __name__ == "__main__":
    main()
