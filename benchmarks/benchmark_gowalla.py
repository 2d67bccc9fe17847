"""Speed and memory figures on Gowalla (or any dataset) for recbole-ccd.

Each part runs in a fresh process and prints its figures; nothing here is a test.

    python benchmarks/benchmark_gowalla.py evaluate     # stage-0 test evaluation, 64-dim MF
    python benchmarks/benchmark_gowalla.py lightgcn     # one LightGCN epoch on stage 0, dim 64
    python benchmarks/benchmark_gowalla.py bpr          # BPR finetune through every stage
    python benchmarks/benchmark_gowalla.py distil       # CCD stage 0: teachers + distillation
    python benchmarks/benchmark_gowalla.py ccd          # the whole CCD stream
    python benchmarks/benchmark_gowalla.py ccd --output_dir=outputs/compare-gowalla/ccd

Extra ``--key=value`` flags go to the config (e.g. ``--epochs=1``).
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import recbole_ccd  # noqa: E402,F401

import torch  # noqa: E402


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


def load(model: str, dataset: str, overrides: dict):
    from recbole_ccd.config import CCDConfig, validate_stream_config
    from recbole_ccd.data import build_stages, create_stream_dataset

    config = CCDConfig(model=model, dataset=dataset,
                       config_dict={"show_progress": False, **overrides})
    validate_stream_config(config)
    start = time.time()
    stages = build_stages(config, create_stream_dataset(config))
    print(f"load + stages: {time.time() - start:.1f} s, {len(stages)} stages")
    return config, stages


def bench_evaluate(dataset: str, overrides: dict) -> None:
    from recbole_ccd.evaluation import evaluate_scorer, model_scorer
    from recbole_ccd.model import MF

    config, stages = load("MF", dataset, overrides)
    stage = stages[0]
    model = MF(config, stage.train)
    model.set_stage(stage.n_users, stage.n_items, None)
    model.eval()
    users = len(stage.test_loader.uid_list)
    start = time.time()
    evaluate_scorer(model_scorer(model), stage.test_loader, config, stage.n_items)
    seconds = time.time() - start
    print(f"evaluate stage-0 test: {users} users x {stage.n_items - 1} items, "
          f"64-dim MF: {seconds:.2f} s (target < 10 s)")


def bench_lightgcn(dataset: str, overrides: dict) -> None:
    from recbole_ccd.model import LightGCN
    from recbole_ccd.trainer.ccd import bpr_sum, sample_negatives

    config, stages = load("LightGCN", dataset, overrides)
    stage = stages[0]
    model = LightGCN(config, stage.train)
    model.set_stage(stage.n_users, stage.n_items, stage.train_matrix())
    optimizer = torch.optim.Adam(model.parameters(), lr=config["learning_rate"])
    users, items = stage.train_pairs()
    batch = config["train_batch_size"]
    start = time.time()
    negatives = torch.from_numpy(sample_negatives(users.numpy(), stage.train_matrix(),
                                                  stage.n_items))
    order = torch.randperm(len(users))
    model.train()
    for begin in range(0, len(order), batch):
        idx = order[begin:begin + batch]
        user_all, item_all = model()
        loss = bpr_sum(user_all[users[idx]], item_all[items[idx]], item_all[negatives[idx]])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f"LightGCN epoch on stage 0 ({len(users)} interactions, batch {batch}, dim "
          f"{config['embedding_size']}): {time.time() - start:.1f} s")


OUTPUT_DIR = None  # --output_dir (a new folder); a temporary one by default


def run_stream(model: str, dataset: str, overrides: dict) -> None:
    from recbole_ccd.quick_start import run_stream as run

    output = OUTPUT_DIR or tempfile.mkdtemp(prefix=f"bench-{model}-")
    start = time.time()
    summary = run(model, dataset, config_dict={"show_progress": False, **overrides},
                  output_dir=output)
    total = time.time() - start
    print(f"\n{model} on {dataset}: {total / 60:.1f} min in all, peak RSS {peak_rss_gib():.2f} "
          f"GiB, output {output}")
    for stage, steps in summary["timing"].items():
        print(f"  {stage}: " + ", ".join(f"{k} {v:.1f} s" for k, v in steps.items()))
    if "parameters" in summary:
        print(f"  parameters: {summary['parameters']}")


def bench_distil(dataset: str, overrides: dict) -> None:
    run_stream("CCD", dataset, {"stages_to_run": 1, **overrides})


PARTS = {
    "evaluate": bench_evaluate,
    "lightgcn": bench_lightgcn,
    "bpr": lambda d, o: run_stream("BPR", d, {"stream_strategy": "finetune", **o}),
    "distil": bench_distil,
    "ccd": lambda d, o: run_stream("CCD", d, o),
}


def parse_overrides(extra: list[str]) -> dict:
    overrides = {}
    for arg in extra:
        key, _, value = arg.lstrip("-").partition("=")
        try:
            overrides[key] = eval(value, {}, {})  # same literal parsing as RecBole's flags
        except Exception:  # noqa: BLE001
            overrides[key] = value
    return overrides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=[*PARTS, "all"])
    parser.add_argument("--dataset", default="gowalla")
    parser.add_argument("--output_dir", default=None,
                        help="new folder for a stream's results (e.g. for compare.py's --root)")
    args, extra = parser.parse_known_args()
    global OUTPUT_DIR
    OUTPUT_DIR = args.output_dir
    if args.part == "all":
        for part in ("evaluate", "lightgcn", "bpr"):
            subprocess.run([sys.executable, __file__, part, f"--dataset={args.dataset}",
                            *extra], check=True)
        return
    sys.argv = sys.argv[:1]
    torch.set_num_threads(torch.get_num_threads())
    PARTS[args.part](args.dataset, parse_overrides(extra))
    print(f"peak RSS: {peak_rss_gib():.2f} GiB")


if __name__ == "__main__":
    main()
