"""Run CCD and the reference pipelines through one stream and print a comparison table.

    python benchmarks/compare.py --dataset=ml-100k
    python benchmarks/compare.py --dataset=gowalla --only=ccd,distil_once --epochs=10

Each entry runs in its own process (``run_ccd.py``) and writes its own output folder under
``--root``; the table reads their ``results.json`` (entries already finished are reused, so
the script can be re-run after an interruption). Extra ``--key=value`` flags go to every run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (model, flags, roles to report)
ENTRIES = {
    "ccd": ("CCD", [], ["student", "teacher"]),
    "ccd_history": ("CCD", ["--ccd_graph=history"], ["student", "teacher"]),
    "distil_once": ("CCD", ["--ccd_mode=distil_once"], ["student", "teacher"]),
    "ccd_teachers_alone": ("CCD", ["--teacher_use_student_knowledge=False"], ["teacher"]),
    "student_finetune": ("LightGCN", ["--embedding_size=16", "--stream_strategy=finetune"],
                         ["model"]),
    "bpr_finetune": ("BPR", ["--stream_strategy=finetune"], ["model"]),
    "bpr_retrain": ("BPR", ["--stream_strategy=retrain"], ["model"]),
    "lightgcn_finetune": ("LightGCN", ["--stream_strategy=finetune"], ["model"]),
    "lightgcn_retrain": ("LightGCN", ["--stream_strategy=retrain"], ["model"]),
}
LABELS = {
    ("ccd", "student"): "CCD student",
    ("ccd", "teacher"): "CCD teacher system",
    ("ccd_history", "student"): "CCD student, ccd_graph: history",
    ("ccd_history", "teacher"): "CCD teacher system, ccd_graph: history",
    ("distil_once", "student"): "distil once, then fine-tune: student",
    ("distil_once", "teacher"): "distil once: teacher system (stage 0 only)",
    ("ccd_teachers_alone", "teacher"):
        "teacher system updated without the student side (structure distillation only)",
    ("student_finetune", "model"): "fine-tuned student (LightGCN, 16 dims)",
    ("bpr_finetune", "model"): "RecBole BPR, finetune",
    ("bpr_retrain", "model"): "RecBole BPR, retrain",
    ("lightgcn_finetune", "model"): "LightGCN (64 dims), finetune",
    ("lightgcn_retrain", "model"): "LightGCN (64 dims), retrain",
}


# CCD's role -> the competitors it is measured against, stage by stage (the paper's "gain over
# the best continual-learning competitor").
GAINS = {
    ("ccd", "student"): [("distil_once", "student"), ("student_finetune", "model")],
    ("ccd_history", "student"): [("distil_once", "student"), ("student_finetune", "model")],
    ("ccd", "teacher"): [("ccd_teachers_alone", "teacher")],
}


def gains(bodies: dict, ours: tuple, others: list, metric: str = "recall@20"):
    """Per incremental stage: H-mean of ``ours`` minus the best H-mean among ``others``
    (None when ``ours`` or every competitor is missing)."""
    present = [bodies[o]["per_stage"][metric]["H-mean"] for o in others if o in bodies]
    if ours not in bodies or not present:
        return None
    mine = bodies[ours]["per_stage"][metric]["H-mean"]
    return [value - max(other[k] for other in present) for k, value in enumerate(mine)]


def run_entry(name: str, dataset: str, root: str, extra: list[str]) -> dict:
    out = os.path.join(root, name)
    results = os.path.join(out, "results.json")
    if os.path.isfile(results):
        with open(results, encoding="utf-8") as handle:
            done = json.load(handle)
        if done["completed_stages"] == done["n_stages"]:
            return done
    model, flags, _ = ENTRIES[name]
    command = [sys.executable, os.path.join(REPO, "run_ccd.py"), f"--model={model}",
               f"--dataset={dataset}", f"--output_dir={out}", "--show_progress=False",
               *flags, *extra]
    if os.path.isdir(out):
        command = [sys.executable, os.path.join(REPO, "run_ccd.py"), f"--resume={out}"]
    start = time.time()
    with open(os.path.join(root, f"{name}.log"), "w", encoding="utf-8") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)
    print(f"{name}: {(time.time() - start) / 60:.1f} min", flush=True)
    with open(results, encoding="utf-8") as handle:
        return json.load(handle)


def fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def table(rows: list[tuple[str, dict]], metrics: list[str]) -> str:
    header = "| model | " + " | ".join(f"{part} {m}" for m in metrics
                                        for part in ("LA", "RA", "H-mean")) + " |"
    lines = [header, "|" + " --- |" * (1 + 3 * len(metrics))]
    for label, body in rows:
        cells = [fmt(body[part][m]) for m in metrics for part in ("LA", "RA", "H-mean")]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--root", default=None, help="folder for the runs")
    parser.add_argument("--only", default=",".join(n for n in ENTRIES if n != "ccd_history"),
                        help="comma-separated entries (ccd_history runs only when named)")
    args, extra = parser.parse_known_args()
    root = args.root or os.path.join("outputs", f"compare-{args.dataset}")
    os.makedirs(root, exist_ok=True)
    bodies = {}
    for name in args.only.split(","):
        results = run_entry(name, args.dataset, root, extra)
        for role in ENTRIES[name][2]:
            bodies[(name, role)] = results["results"][role]
    rows = [(LABELS[key], body) for key, body in bodies.items()]
    metrics = ["recall@20", "ndcg@20"]
    print(table(rows, metrics))
    lines = ["\nH-mean of recall@20 after each incremental stage:"]
    for label, body in rows:
        values = body["per_stage"]["recall@20"]["H-mean"]
        lines.append(f"  {label}: " + ", ".join(fmt(v) for v in values))
    for ours, others in GAINS.items():
        gain = gains(bodies, ours, others)
        if gain is not None:
            lines.append(f"\n{LABELS[ours]}, gain in H-mean of recall@20 over the best of "
                         + " / ".join(LABELS[o] for o in others if o in bodies)
                         + ", per stage: " + ", ".join(f"{g:+.4f}" for g in gain))
    print("\n".join(lines))

if __name__ == "__main__":
    main()
