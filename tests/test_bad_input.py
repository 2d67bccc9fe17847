"""Bad input stops the command line before training: exit code 2, one ``error:`` line that
names what to fix, and no output folder left behind."""

from __future__ import annotations

import sys

import pytest

from conftest import HEADER, random_rows, write_inter

pytestmark = pytest.mark.usefixtures("isolated")

GOOD = random_rows(20, 30, 300, seed=0, min_per_user=5)  # 300 rows, data lines 2..301


def _line(row):
    return "\t".join(str(v) for v in row)


# name -> (header, data lines, extra flags, words the message must contain)
CASES = {
    "missing timestamp column": (
        "user_id:token\titem_id:token", [f"{u}\t{i}" for u, i, _ in GOOD], [],
        ["d.inter", "'timestamp'", "TIME_FIELD"]),
    "timestamp declared as token": (
        HEADER.replace("timestamp:float", "timestamp:token"), [_line(r) for r in GOOD], [],
        ["d.inter", "timestamp:float"]),
    "non-numeric timestamp": (
        HEADER, [_line(r) for r in GOOD[:9]] + ["u1\ti2\tyesterday"] + [_line(r) for r in GOOD[9:]],
        [], ["d.inter", "'timestamp'", "line 11 of the file", "'yesterday'"]),
    "empty timestamp": (
        HEADER, [_line(r) for r in GOOD] + ["u1\ti2\t"], [],
        ["d.inter", "'timestamp'", "line 302 of the file"]),
    "empty user id": (
        HEADER, [_line(r) for r in GOOD[:4]] + ["\ti2\t5"] + [_line(r) for r in GOOD[4:]], [],
        ["d.inter", "'user_id'", "line 6 of the file"]),
    "NaN user id": (
        HEADER, [_line(r) for r in GOOD] + ["NaN\ti2\t99999"], [],
        ["d.inter", "'user_id'", "line 302 of the file"]),
    "empty file": ("", [], [], ["d.inter", "is empty", "header"]),
    "dataset folder missing": (None, None, [], ["does not exist", "data_path"]),
    "CCD epochs zero": (HEADER, [_line(r) for r in GOOD], ["--model=CCD", "--distill_epochs=0"],
                        ["distill_epochs", "positive integer"]),
    "CCD batch negative": (HEADER, [_line(r) for r in GOOD],
                           ["--model=CCD", "--update_batch_size=-5"],
                           ["update_batch_size", "positive integer"]),
    "unknown model": (HEADER, [_line(r) for r in GOOD], ["--model=NoSuchModel"],
                      ["unknown model", "NoSuchModel"]),
    "too few distinct timestamps": (
        HEADER, ["a\tx\t1", "a\ty\t1", "b\tx\t2", "b\ty\t2"], ["--stage_incremental=3"],
        ["2 distinct timestamps", "4 stages", "stage_incremental"]),
    "boundaries leave a stage empty": (
        HEADER, [_line(r) for r in GOOD], ["--stage_boundaries=[1100,5000]"],
        ["stage 2 holds no interactions", "stage_boundaries"]),
    "stage with no training interactions": (
        # After the 300 good rows, 30 users with one interaction each form stage 1.
        HEADER, [_line(r) for r in GOOD] + [f"new{j}\ti{j}\t{5000 + j}" for j in range(30)],
        ["--stage_boundaries=[5000]"], ["stage 1 has no training interactions"]),
    "split ratios do not add up": (
        HEADER, [_line(r) for r in GOOD], ["--stage_split_ratios=[0.7,0.2,0.2]"],
        ["stage_split_ratios", "add up to 1"]),
    "unknown stream strategy": (
        HEADER, [_line(r) for r in GOOD], ["--stream_strategy=replay"],
        ["stream_strategy", "'replay'"]),
    "topk beyond the items": (
        HEADER, [_line(r) for r in GOOD], ["--topk=[10,40]", "--valid_metric=Recall@10"],
        ["topk", "30"]),
    "valid_metric not computed": (
        HEADER, [_line(r) for r in GOOD], ["--valid_metric=Recall@20"],
        ["valid_metric", "Recall@20"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_stops_before_training(case, tmp_path, monkeypatch, capsys):
    import recbole_ccd.quick_start as quick_start

    header, lines, extra, words = CASES[case]
    if header is not None:
        path = tmp_path / "data" / "d" / "d.inter"
        path.parent.mkdir(parents=True)
        path.write_text("\n".join([header] + lines) + "\n" if header else "", encoding="utf-8")

    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(quick_start, "make_learner", no_training)
    flags = {"--model": "BPR", "--dataset": "d", "--data_path": str(tmp_path / "data"),
             "--epochs": "1", "--show_progress": "False", "--stage_incremental": "1",
             "--topk": "[5,10]", "--valid_metric": "Recall@5", "--use_gpu": "False"}
    flags.update(flag.split("=", 1) for flag in extra)
    argv = [f"{key}={value}" for key, value in flags.items()]
    # main() parses argv itself, but RecBole's Config reads sys.argv for --key=value.
    monkeypatch.setattr(sys, "argv", ["run_ccd.py", *argv])

    code = quick_start.main(argv)

    err = capsys.readouterr().err
    message = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2
    assert len(message) == 1, err
    for word in words:
        assert word in message[0]
    expected_left = ["data"] if header is not None else []
    assert sorted(p.name for p in tmp_path.iterdir()) == expected_left


def test_good_input_passes_the_same_checks(tmp_path, make_config):
    """The base file of the cases above is accepted (so each case fails for its own reason)."""
    from recbole_ccd.config import validate_stream_config
    from recbole_ccd.data import build_stages, create_stream_dataset

    write_inter(tmp_path / "data", "d", GOOD)
    config = make_config("d", model="BPR", data_path=str(tmp_path / "data"), stage_incremental=1)
    validate_stream_config(config)
    assert len(build_stages(config, create_stream_dataset(config))) == 2


def test_cli_rejects_reused_output_folders_bad_config_files_and_resume_options(
        tmp_path, monkeypatch, capsys):
    from recbole_ccd.quick_start import main

    monkeypatch.chdir(tmp_path)
    used = tmp_path / "used"
    used.mkdir()
    (used / "results.json").write_text("{}")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("epochs: [1, 2\n")
    empty_yaml = tmp_path / "empty.yaml"
    empty_yaml.write_text("# nothing set\n")
    list_yaml = tmp_path / "list.yaml"
    list_yaml.write_text("- 1\n- 2\n")
    cases = [
        ([f"--output_dir={used}"], ["already holds files", "--resume"]),
        ([f"--output_dir={a_file}"], ["is a file"]),
        (["--config_files=missing.yaml"], ["missing.yaml", "does not exist"]),
        ([f"--config_files={bad_yaml}"], ["bad.yaml", "not valid yaml"]),
        ([f"--config_files={empty_yaml}"], ["empty.yaml", "'key: value'", "holds nothing"]),
        ([f"--config_files={list_yaml}"], ["list.yaml", "'key: value'", "holds a list"]),
        ([f"--resume={used}", "--epochs=3"], ["--resume", "no other options"]),
    ]
    for args, words in cases:
        monkeypatch.setattr(sys, "argv", ["run_ccd.py", *args])
        assert main() == 2, args
        message = capsys.readouterr().err
        assert message.startswith("error: ")
        for word in words:
            assert word in message, (args, message)
    # nothing was written into the reused folder, and no new folder appeared
    assert sorted(p.name for p in used.iterdir()) == ["results.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "bad.yaml", "empty.yaml",
                                                          "list.yaml", "used"]
