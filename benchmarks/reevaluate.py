"""Evaluate a finished run again from its checkpoints and compare with its results.json.

    python benchmarks/reevaluate.py outputs/compare-gowalla/ccd

For every completed stage k, the learner is restored from ``checkpoints/stage_k.pt`` and
every role is evaluated on the test split of each stage j <= k with the current code; the
script prints the largest difference from the stored matrix per role and metric. A check of
the checkpoints (they must restore the evaluated models) and of changes to the evaluation.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import recbole_ccd  # noqa: E402,F401

from recbole.utils import init_seed  # noqa: E402

from recbole_ccd.compat import load_checkpoint  # noqa: E402
from recbole_ccd.config import CCDConfig, validate_stream_config  # noqa: E402
from recbole_ccd.data import build_stages, create_stream_dataset  # noqa: E402
from recbole_ccd.evaluation import evaluate_scorer  # noqa: E402
from recbole_ccd.quick_start import INVOCATION_FILE, make_learner  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir")
    args = parser.parse_args()
    sys.argv = sys.argv[:1]  # RecBole's Config reads --key=value from sys.argv
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
    worst: dict[tuple[str, str], float] = {}
    start = time.time()
    for k in range(stored["completed_stages"]):
        state = load_checkpoint(os.path.join(args.output_dir, "checkpoints", f"stage_{k}.pt"))
        learner.load_state_dict(state["learner"])
        learner._current = k
        learner.eval_mode()
        for role in learner.roles:
            scorer = learner.scorer(role)
            for j in range(k + 1):
                row = evaluate_scorer(scorer, stages[j].test_loader, config, stages[k].n_items)
                for metric, matrix in stored["results"][role]["matrix"].items():
                    key = (role, metric)
                    worst[key] = max(worst.get(key, 0.0), abs(row[metric] - matrix[k][j]))
        print(f"stage {k} re-evaluated ({time.time() - start:.0f} s)", flush=True)
    for (role, metric), difference in sorted(worst.items()):
        print(f"{role:>8} {metric:>10}: largest difference {difference:.2e}")


if __name__ == "__main__":
    main()
