"""One call that runs a model through the stream: :func:`run_stream`."""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from datetime import datetime
from logging import getLogger

from recbole_ccd import compat  # noqa: F401

import colorlog
import yaml
from recbole.utils import init_seed
from recbole.utils.logger import RemoveColorFilter, log_colors_config

from recbole_ccd.compat import write_text_atomic
from recbole_ccd.config import CCDConfig, validate_stream_config
from recbole_ccd.data import build_stages, create_stream_dataset
from recbole_ccd.errors import StreamConfigError
from recbole_ccd.trainer.stream import SingleModelLearner, StreamRunner

INVOCATION_FILE = "invocation.json"


def remove_log_handlers() -> None:
    """Close and remove the console and file handlers this module added to the root logger."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_recbole_ccd", False):
            root.removeHandler(handler)
            handler.close()


def _setup_console_logging(level: int = logging.INFO) -> None:
    root = logging.getLogger()
    root.setLevel(level)
    remove_log_handlers()
    handler = logging.StreamHandler()
    handler.setFormatter(colorlog.ColoredFormatter(
        "%(log_color)s%(asctime)-15s %(levelname)s  %(message)s", "%d %b %H:%M",
        log_colors=log_colors_config))
    handler._recbole_ccd = True
    root.addHandler(handler)


def _add_file_logging(path: str) -> None:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)-15s %(levelname)s  %(message)s"))
    handler.addFilter(RemoveColorFilter())
    handler._recbole_ccd = True
    logging.getLogger().addHandler(handler)


def check_new_output_dir(path: str) -> None:
    """A new run needs an output folder that does not exist yet or is empty."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise StreamConfigError(f"--output_dir '{path}' is a file; give a folder.")
    if os.path.isdir(path) and os.listdir(path):
        raise StreamConfigError(
            f"--output_dir '{path}' already holds files (an earlier run?): continue it with "
            f"--resume={path}, or choose another --output_dir.")


def default_output_dir(model: str, dataset: str) -> str:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join("outputs", f"{model}-{dataset}-{stamp}")


def make_learner(config, stages, output_dir):
    """The learner for ``config['model']``: CCD's teacher system and student, or one model."""
    if config["model"] == "CCD":
        from recbole_ccd.trainer.ccd import CCDLearner

        return CCDLearner(config, stages, output_dir)
    return SingleModelLearner(config, stages, output_dir)


def read_config_files(paths: list[str] | None) -> dict:
    """The settings of the ``--config_files`` yaml files, later files winning; each must
    exist and hold ``key: value`` settings."""
    settings: dict = {}
    for path in paths or []:
        if not os.path.isfile(path):
            raise StreamConfigError(f"config file '{path}' does not exist (--config_files).")
        try:
            with open(path, encoding="utf-8") as handle:
                content = yaml.safe_load(handle)
        except yaml.YAMLError as error:
            raise StreamConfigError(f"config file '{path}' is not valid yaml: {error}") from None
        if not isinstance(content, dict):
            found = "nothing" if content is None else f"a {type(content).__name__}"
            raise StreamConfigError(
                f"config file '{path}' must hold 'key: value' settings; it holds {found}.")
        settings.update(content)
    return settings


class StreamInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run, with what was saved and how to continue."""


def run_stream(
    model: str | None = None,
    dataset: str | None = None,
    config_file_list: list[str] | None = None,
    config_dict: dict | None = None,
    output_dir: str | None = None,
    resume: str | None = None,
) -> dict:
    """Run ``model`` through the time-ordered stages of ``dataset``.

    Args:
        model, dataset, config_file_list, config_dict: as for RecBole's ``Config``; model
            and dataset default to what config_dict, then the config files, set, else CCD
            on ml-100k.
        output_dir: folder for results, logs, checkpoints (default ``outputs/<model>-...``).
        resume: an earlier run's output folder; its settings are reused and the run
            continues after its last completed stage.

    Returns:
        The content of ``results.json``.
    """
    _setup_console_logging()
    from_files = read_config_files(config_file_list)
    # As in RecBole, model and dataset may also come from the settings or the config files.
    model = model or (config_dict or {}).get("model") or from_files.get("model") or "CCD"
    dataset = (dataset or (config_dict or {}).get("dataset") or from_files.get("dataset")
               or "ml-100k")
    if output_dir is not None and resume is None:
        check_new_output_dir(output_dir)
    if resume is not None:
        invocation_path = os.path.join(resume, INVOCATION_FILE)
        if not os.path.isfile(invocation_path):
            raise StreamConfigError(
                f"cannot resume: '{invocation_path}' not found; pass the output folder of an "
                "earlier run.")
        with open(invocation_path, encoding="utf-8") as handle:
            invocation = json.load(handle)
        model, dataset = invocation["model"], invocation["dataset"]
        config_file_list, config_dict = None, invocation["settings"]
        output_dir = resume

    config = CCDConfig(model=model, dataset=dataset, config_file_list=config_file_list,
                       config_dict=config_dict)
    validate_stream_config(config)
    init_seed(config["seed"], config["reproducibility"])
    stream_dataset = create_stream_dataset(config)
    stages = build_stages(config, stream_dataset)

    if output_dir is None:
        output_dir = default_output_dir(config["model"], config["dataset"])
        check_new_output_dir(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    config["checkpoint_dir"] = os.path.join(output_dir, "checkpoints")
    _add_file_logging(os.path.join(output_dir, "run.log"))
    logger = getLogger()
    if resume is None:
        settings = {k: v for k, v in config.external_config_dict.items()
                    if k not in ("model", "dataset", "output_dir", "resume")}
        write_text_atomic(json.dumps({"model": config["model"], "dataset": config["dataset"],
                                      "settings": settings}, indent=2, default=str),
                          os.path.join(output_dir, INVOCATION_FILE))
    logger.info(f"{config['model']} on {config['dataset']}: {len(stages)} stage"
                f"{'s' if len(stages) > 1 else ''}, output in {output_dir}")

    init_seed(config["seed"], config["reproducibility"])
    learner = make_learner(config, stages, output_dir)
    runner = StreamRunner(config, learner, stages, output_dir)
    try:
        summary = runner.run(resume=resume is not None)
    except KeyboardInterrupt:
        done = runner.last_completed_stage()
        saved = f"stages 0-{done} are saved" if done >= 0 else "no stage had finished"
        message = f"interrupted: {saved}; continue with --resume={output_dir}"
        logger.warning(message)
        raise StreamInterrupted(message) from None
    summary["output_dir"] = output_dir
    return summary


def main(argv: list[str] | None = None) -> int:
    """Command line entry point (see ``run_ccd.py``)."""
    import argparse

    parser = argparse.ArgumentParser(
        description="Run a RecBole model, or CCD, through the time-ordered stages of a dataset. "
                    "Any other --key=value is passed to RecBole's config.")
    parser.add_argument("--model", "-m", default=None, help="default: CCD")
    parser.add_argument("--dataset", "-d", default=None, help="default: ml-100k")
    parser.add_argument("--config_files", default=None,
                        help="space-separated yaml files, as in RecBole")
    parser.add_argument("--output_dir", default=None)
    parser.add_argument("--resume", default=None,
                        help="an earlier run's output folder; its own settings are reused")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    # RecBole 1.2.1 on current pandas/torch/numpy warns about its own code at every run
    # (chained assignment, deprecated AMP and sparse APIs); none of it is actionable here.
    warnings.filterwarnings("ignore", module=r"recbole(\.|$)")
    # RecBole's Config reads --key=value from sys.argv: leave it only what is RecBole's.
    sys.argv = sys.argv[:1] + rest
    if args.resume is not None and (args.model or args.dataset or args.config_files
                                    or args.output_dir or rest):
        print("error: --resume continues a run with the settings it was started with "
              f"({os.path.join(args.resume, INVOCATION_FILE)}); give no other options.",
              file=sys.stderr)
        return 2
    files = args.config_files.strip().split() if args.config_files else None
    try:
        result = run_stream(args.model, args.dataset, files, output_dir=args.output_dir,
                            resume=args.resume)
    except StreamConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except StreamInterrupted as interrupted:
        print(interrupted, file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted before any stage had started.", file=sys.stderr)
        return 130
    print(f"results: {os.path.join(result['output_dir'], 'results.json')}")
    return 0
