"""The command line: model and dataset read from config files, and Ctrl-C during a run."""

from __future__ import annotations

import sys

import pytest

from conftest import random_rows, write_inter

pytestmark = pytest.mark.usefixtures("isolated")

ROWS = random_rows(20, 30, 300, seed=0, min_per_user=5)
FLAGS = ["--epochs=1", "--show_progress=False", "--stage_incremental=1", "--topk=[5,10]",
         "--valid_metric=Recall@5", "--use_gpu=False"]


def _main(monkeypatch, argv: list[str]) -> int:
    from recbole_ccd.quick_start import main

    # main() parses argv itself, but RecBole's Config reads sys.argv for --key=value.
    monkeypatch.setattr(sys, "argv", ["run_ccd.py", *argv])
    return main(argv)


def test_model_and_dataset_come_from_the_config_files_unless_flags_say(
        tmp_path, monkeypatch):
    import recbole_ccd.quick_start as quick_start

    write_inter(tmp_path / "data", "d", ROWS)
    (tmp_path / "a.yaml").write_text(f"model: MF\ndataset: nosuch\ndata_path: {tmp_path}/data\n")
    (tmp_path / "b.yaml").write_text("model: BPR\ndataset: d\n")
    seen = []

    def record(config, stages, output_dir):
        seen.append((config["model"], config["dataset"]))
        raise KeyboardInterrupt

    monkeypatch.setattr(quick_start, "make_learner", record)
    files = f"--config_files={tmp_path}/a.yaml {tmp_path}/b.yaml"
    assert _main(monkeypatch, [files, *FLAGS]) == 130                 # the later file wins
    assert _main(monkeypatch, [files, "--model=MF", *FLAGS]) == 130   # a flag beats a file
    assert seen == [("BPR", "d"), ("MF", "d")]


def test_ctrl_c_names_the_saved_stages_and_the_folder_to_resume(tmp_path, monkeypatch,
                                                                 capsys):
    from recbole_ccd.trainer.stream import StreamRunner

    write_inter(tmp_path / "data", "d", ROWS)
    original_save = StreamRunner.save

    def save_then_interrupt(runner, k):
        original_save(runner, k)
        raise KeyboardInterrupt

    monkeypatch.setattr(StreamRunner, "save", save_then_interrupt)
    out = tmp_path / "run"
    code = _main(monkeypatch, ["--model=BPR", "--dataset=d", f"--data_path={tmp_path}/data",
                               f"--output_dir={out}", *FLAGS])
    message = f"interrupted: stages 0-0 are saved; continue with --resume={out}"
    assert code == 130
    assert message in capsys.readouterr().err
    assert message in (out / "run.log").read_text(encoding="utf-8")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["stage_0.pt"]
