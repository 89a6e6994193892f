"""The `studio` command: the GUI by default, subcommands for headless work on the same core."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="studio", description="Alignment Studio: PPO to shape, DPO to settle.")
    commands = parser.add_subparsers(dest="command")

    gui = commands.add_parser("gui", help="open the studio window (the default)")
    gui.add_argument("--project", type=Path, help="project folder to open")
    gui.add_argument("--demo", action="store_true", help="open the demo project (created on first use)")

    init = commands.add_parser("init", help="create a project folder")
    init.add_argument("dir", type=Path)
    init.add_argument("--name")
    init.add_argument("--model", default="demo",
                      help="'demo' (default), a local Hugging Face folder, or a .gguf file")
    init.add_argument("--allow-pickle", action="store_true",
                      help="accept .bin (pickle) weights in a local folder; they can run code when loaded")
    init.add_argument("--report-to", metavar="TRACKERS",
                      help="the project's default trackers for runs: tensorboard,trackio,wandb")

    demo = commands.add_parser("demo", help="create the demo project (model + bundled data)")
    demo.add_argument("dir", type=Path, nargs="?")
    demo.add_argument("--story", action="store_true",
                      help="then walk through the whole workflow on it: sample the base, PPO, advisor, label "
                           "10 pairs (by the reward), DPO from the advised checkpoint, compare; Ctrl-C stops, "
                           "the same command continues")

    data = commands.add_parser("import", help="import prompts or preference pairs (JSONL, JSON, CSV, Parquet)")
    data.add_argument("dir", type=Path)
    data.add_argument("file", type=Path)
    data.add_argument("--name")
    data.add_argument("--kind", choices=["prompts", "preference"], help="default: detected from the rows")
    data.add_argument("--eval", action="store_true", help="use these prompts as the project's eval prompts")
    data.add_argument("--preview", action="store_true", help="show the first rows and any errors; import nothing")

    listing = commands.add_parser("runs", help="list runs and their checkpoints")
    listing.add_argument("dir", type=Path)
    listing.add_argument("--json", action="store_true")

    train = commands.add_parser("train", help="train headless (Ctrl-C stops cleanly at a step boundary)")
    train.add_argument("dir", type=Path)
    train.add_argument("--method", choices=["dpo", "ppo", "grpo", "rloo"])
    train.add_argument("--config", type=Path, help="JSON file of settings")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override one setting (value parsed as JSON when it can be)")
    train.add_argument("--name")
    train.add_argument("--resume", type=int, metavar="RUN_ID", help="continue a stopped or interrupted run")
    train.add_argument("--report-to", metavar="TRACKERS",
                       help="also send metrics to tensorboard,trackio,wandb (or none); "
                            "default: the project's report_to setting")

    train_reward = commands.add_parser(
        "train-reward", help="train a reward model from the project's labelled pairs (a trained_reward_model source)")
    train_reward.add_argument("dir", type=Path)
    train_reward.add_argument("--name", required=True, help="its name, a folder under the project's reward_models/")
    train_reward.add_argument("--epochs", type=int, default=2)
    train_reward.add_argument("--include-datasets", action="store_true",
                              help="also train on the imported preference datasets, not only your labels")

    export = commands.add_parser("export", help="export labelled pairs, an adapter, a merged model or a GGUF file")
    export.add_argument("dir", type=Path)
    export.add_argument("out", type=Path)
    what = export.add_mutually_exclusive_group(required=True)
    what.add_argument("--labels", action="store_true", help="labelled pairs as TRL preference JSONL")
    what.add_argument("--adapter", type=int, metavar="CHECKPOINT_ID", help="PEFT adapter folder")
    what.add_argument("--merged", type=int, metavar="CHECKPOINT_ID", help="full model folder (transformers)")
    what.add_argument("--gguf", type=int, metavar="CHECKPOINT_ID",
                      help="merged model as GGUF (llama.cpp, Ollama) with an Ollama Modelfile")
    export.add_argument("--quant", default="f16", help="GGUF tensor type: f16 (default), q8_0, bf16 or f32")

    check = commands.add_parser("check", help="check a project: the whole database and every checkpoint's files")
    check.add_argument("dir", type=Path)

    backup = commands.add_parser("backup", help="copy the project's database safely, even while it is open")
    backup.add_argument("dir", type=Path)
    backup.add_argument("--to", type=Path, help="the backup file (default: a rotating one in DIR/backups/)")
    add_scale_out_commands(commands)
    return parser


def add_scale_out_commands(commands) -> None:
    """Run bundles, data-parallel runs and hand-off to other engines (docs/scale-out.md)."""
    bundle = commands.add_parser("bundle", help="write a run as a self-contained folder for another machine")
    bundle.add_argument("dir", type=Path)
    bundle.add_argument("run_id", type=int)
    bundle.add_argument("out", type=Path)
    bundle.add_argument("--no-model", action="store_true",
                        help="leave the base model out: the other machine must have it where this project has it")

    run_bundle = commands.add_parser("run-bundle", help="train a bundle's run (also under torchrun / accelerate launch)")
    run_bundle.add_argument("bundle", type=Path)

    import_run = commands.add_parser("import-run", help="bring a bundle or a TRL output folder back as a run")
    import_run.add_argument("dir", type=Path)
    import_run.add_argument("source", type=Path)
    import_run.add_argument("--follow", action="store_true", help="keep importing until the run ends")
    import_run.add_argument("--interval", type=float, default=2.0, help="seconds between imports with --follow")

    export_job = commands.add_parser("export-job", help="a run as a job for TRL, OpenRLHF or verl")
    export_job.add_argument("dir", type=Path)
    export_job.add_argument("run_id", type=int)
    export_job.add_argument("--engine", required=True, choices=["trl", "openrlhf", "verl"])
    export_job.add_argument("out", type=Path)


def parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def cmd_gui(args) -> int:
    from studio.ui.app import main as gui_main

    project = args.project
    if args.demo:
        from studio.core.demo import ensure_demo_project

        project = ensure_demo_project()
    return gui_main(project)


def cmd_init(args) -> int:
    from studio.core import trackers
    from studio.core.models import ModelSource, resolve_folder
    from studio.core.store import Project, set_setting

    if args.model == "demo":
        source = ModelSource("demo")
    else:
        model_path = Path(args.model).expanduser().resolve()
        kind = "gguf" if model_path.suffix == ".gguf" else "folder"
        source = ModelSource(kind, str(model_path), allow_pickle=args.allow_pickle)
        resolve_folder(source)  # refuse a model that cannot load, before creating anything
    report_to = trackers.parse_report_to(args.report_to)  # refuse a typo before creating anything
    with Project.create(args.dir, name=args.name, base_model=source.to_json()) as project:
        if report_to:
            set_setting(project.db, "report_to", report_to)
        print(f"Created project {project.path} on {source.describe()}")
    return 0


def cmd_demo(args) -> int:
    from studio.core.demo import DEFAULT_DEMO_PROJECT, ensure_demo_project

    path = ensure_demo_project(args.dir or DEFAULT_DEMO_PROJECT)
    print(path)
    return run_story(path) if args.story else 0


def run_story(path: Path) -> int:
    from studio.core import runs, story

    control = runs.RunControl()

    def on_interrupt(*_):
        print("\nstopping at the next step boundary (Ctrl-C again to stop at once)...", flush=True)
        control.stop()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    signal.signal(signal.SIGINT, on_interrupt)
    walkthrough = story.Story(path, say=lambda line: print(line, flush=True), control=control,
                              on_metrics=print_record)
    try:
        times = walkthrough.run()
    except (story.Stopped, KeyboardInterrupt):
        print(f"\nStopped; everything finished so far is kept. Run `studio demo {path} --story` again to continue.")
        return 130
    print("\nWall time per stage: " + ", ".join(f"{key} {story.format_seconds(seconds)}"
                                              for key, seconds in times.items()))
    return 0


def cmd_import(args) -> int:
    from studio.core import datasets
    from studio.core.store import Project

    if args.preview:
        loaded = datasets.preview(args.file)
        print(f"{args.file}: {loaded.fmt}, {loaded.kind}" + (f" (TRL {loaded.trl_format})" if loaded.trl_format else ""))
        print(loaded.summary())
        for column, use in loaded.column_plan():
            print(f"  column {column!r}: {use}")
        for row in loaded.rows:
            print(json.dumps(row, ensure_ascii=False)[:200])
        for error in loaded.errors:
            print(f"error: {error}", file=sys.stderr)
        return 1 if loaded.errors else 0
    with Project.open(args.dir) as project:
        dataset_id = datasets.import_file(project.db, args.file, name=args.name, kind=args.kind, as_eval=args.eval)
        row = project.db["datasets"].get(dataset_id)
    print(f"Imported {row['row_count']} {row['kind']} rows from {args.file} as dataset {dataset_id}")
    return 0


def cmd_runs(args) -> int:
    from studio.core import store

    with store.Project.open(args.dir, read_only=True) as project:
        runs = store.list_runs(project.db)
        for run in runs:
            run["checkpoints"] = [{"id": c["id"], "step": c["step"], "path": str(store.checkpoint_folder(project.db, c))}
                                  for c in store.checkpoints(project.db, run["id"])]
    if args.json:
        print(json.dumps(runs, indent=2))
        return 0
    if not runs:
        print("No runs yet.")
    for run in runs:
        steps = run["checkpoints"][-1]["step"] if run["checkpoints"] else 0
        checkpoint_ids = ", ".join(str(c["id"]) for c in run["checkpoints"]) or "none"
        print(f"{run['id']:>4}  {run['name']:<12} {run['status']:<11} step {steps:<6} checkpoints: {checkpoint_ids}")
        if run["error"]:
            print(f"      error: {run['error']}")
    return 0


def cmd_train(args) -> int:
    from studio.core import runs, store, trackers
    from studio.core.models import model_parameters

    with store.Project.open(args.dir) as project:
        if args.resume is not None:
            if args.report_to is not None:
                raise runs.ConfigError("--report-to sets up a new run; a resumed run reports where it did")
            run_id = args.resume
            method = store.get_run(project.db, run_id)["method"]
        else:
            if not args.method:
                raise runs.ConfigError("--method dpo|ppo|grpo|rloo is required for a new run")
            overrides = json.loads(args.config.read_text()) if args.config else {}
            for item in args.set:
                key, _, value = item.partition("=")
                overrides[key] = parse_value(value)
            if args.report_to is not None:
                overrides["report_to"] = trackers.parse_report_to(args.report_to)
            config = runs.make_config(args.method, overrides, model_parameters(project.db))
            run_id = runs.create_run(project.db, config, name=args.name)
            method = args.method
        control = runs.RunControl()
        signal.signal(signal.SIGINT, lambda *_: (print("\nstopping at the next step boundary..."), control.stop()))
        print(f"Run {run_id} ({method.upper()}) in {project.path}")
        status = runs.execute(project.path, run_id, control, on_metrics=print_record,
                              on_log=lambda message: print(f"[run {run_id}] {message}"))
    return 0 if status in ("completed", "stopped") else 1


def cmd_train_reward(args) -> int:
    import threading

    from studio.core import rewards

    if args.epochs < 1:
        raise rewards.RewardError(f"--epochs must be at least 1 (got {args.epochs})")
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: (print("\nstopping at the next step..."), stop.set()))
    settings = rewards.RewardModelTraining(name=args.name, epochs=args.epochs, include_datasets=args.include_datasets)
    report = rewards.train_reward_model(
        args.dir, settings, stop=stop,
        on_step=lambda step: print(f"step {step['step']:>4}  epoch {step['epoch'] + 1}  loss={step['loss']:.4g}  "
                                   f"accuracy={step['accuracy']:.2f}", flush=True))
    if report is None:
        print("Stopped: no reward model saved")
        return 1
    heldout = report["heldout_accuracy"]
    print(f"Reward model {report['name']!r} saved to {report['path']}: {report['train_pairs']} training pairs, "
          f"held-out accuracy {'n/a' if heldout is None else f'{heldout:.2f}'} on {report['heldout_pairs']} pairs. "
          f'Use it as the reward source {{"type": "trained_reward_model", "model": "{report["name"]}"}}')
    return 0


SUMMARY_KEYS = ("loss", "rewards/accuracies", "rewards/margins", "objective/scores", "objective/kl",
                "objective/rlhf_reward", "reward", "kl", "completions/mean_length", "tokens_per_second",
                "step_seconds")


def print_record(record: dict) -> None:
    shown = "  ".join(f"{key}={record[key]:.4g}" for key in SUMMARY_KEYS if key in record)
    print(f"step {record['step']:>5}  {shown}", flush=True)


def cmd_export(args) -> int:
    from studio.core import export, store

    with store.Project.open(args.dir, read_only=True) as project:
        if args.labels:
            from studio.core.datasets import export_preference_jsonl

            count = export_preference_jsonl(store.labelled_pairs(project.db), args.out)
            print(f"Exported {count} labelled pairs to {args.out}")
        elif args.adapter is not None:
            print(f"Adapter written to {export.export_adapter(project.db, args.adapter, args.out)} (card: README.md)")
        elif args.merged is not None:
            print(f"Merged model written to {export.export_merged(project.db, args.merged, args.out)} (card: README.md)")
        else:
            path = export.export_gguf(project.db, args.gguf, args.out, args.quant)
            print(f"GGUF written to {path}, with Modelfile and README.md beside it")
    return 0


def cmd_check(args) -> int:
    from studio.core.health import check_project

    problems = check_project(args.dir)
    for problem in problems:
        print(f"problem: {problem}")
    print(f"{args.dir}: {len(problems)} problem{'s' if len(problems) != 1 else ''}" if problems else f"{args.dir}: ok")
    return 1 if problems else 0


def cmd_backup(args) -> int:
    from studio.core import store

    with store.Project.open(args.dir, read_only=True) as project:
        made = store.backup(project.db, args.to) if args.to else store.rotating_backup(project.db, project.path, "manual")
    print(f"Backed up {args.dir / store.DB_NAME} to {made}")
    return 0


def cmd_bundle(args) -> int:
    from studio.core import bundles

    out = bundles.make_bundle(args.dir, args.run_id, args.out, include_model=not args.no_model)
    print(f"Bundle written to {out}; run it with: studio run-bundle {out}")
    return 0


def cmd_run_bundle(args) -> int:
    from studio.core import bundles, runs

    control = runs.RunControl()
    signal.signal(signal.SIGINT, lambda *_: (print("\nstopping at the next step boundary..."), control.stop()))
    is_main = int(os.environ.get("RANK", "0")) == 0  # only rank 0 prints: the others train in step with it
    status = bundles.run_bundle(args.bundle, control, on_metrics=print_record if is_main else None,
                                on_log=(lambda message: print(f"[bundle] {message}", flush=True)) if is_main else None)
    return 0 if status in ("completed", "stopped") else 1


def cmd_import_run(args) -> int:
    from studio.core import bundles, store

    def report(run_id: int, status: str) -> None:
        print(f"Run {run_id}: {status}", flush=True)

    with store.Project.open(args.dir) as project:
        if args.follow:
            bundles.follow(project.db, project.path, args.source, args.interval, on_import=report)
        else:
            run_id = bundles.import_run(project.db, project.path, args.source)
            print(f"Imported {args.source} as run {run_id}")
    return 0


def cmd_export_job(args) -> int:
    from studio.core import handoff

    script = handoff.export_job(args.dir, args.run_id, args.engine, args.out)
    print(f"{args.engine} job written to {args.out}; launch it with: bash {script}")
    return 0


COMMANDS = {"gui": cmd_gui, "init": cmd_init, "demo": cmd_demo, "import": cmd_import, "runs": cmd_runs,
            "train": cmd_train, "export": cmd_export, "check": cmd_check, "backup": cmd_backup,
            "bundle": cmd_bundle, "run-bundle": cmd_run_bundle, "import-run": cmd_import_run,
            "export-job": cmd_export_job, "train-reward": cmd_train_reward}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command is None:
        args = build_parser().parse_args(["gui", *(argv or sys.argv[1:])])
    from studio.core.errors import describe_error  # light: the GUI path must not import torch here

    try:
        return COMMANDS[args.command](args)
    except Exception as exc:  # a user sees a sentence, never a traceback (STUDIO_DEBUG=1 shows it)
        if os.environ.get("STUDIO_DEBUG"):
            raise
        print(f"studio: error: {describe_error(exc, getattr(args, 'dir', None))}", file=sys.stderr)
        return 2
