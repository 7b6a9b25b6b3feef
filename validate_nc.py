"""Measure Neural Collapse at every analysis checkpoint of a run, then draw the paper's Figures 2-7
(and Figure 9, the later papers' measures; see docs/other_measures.md).

    python validate_nc.py --dataset CIFAR10        # the run `python train.py --dataset CIFAR10` made
    python validate_nc.py --run-dir runs/NAME      # any run folder

For each checkpoint, in epoch order, the model is rebuilt from the checkpoint's own config, run once
in strict float32 over the class-balanced training subset it was trained on (clean: no augmentation,
no Mixup) and once over the test split, and a row is added to <run>/nc_metrics.csv. Checkpoints already
in the table are skipped (unless --recompute), so a run still training can be validated again later.
Figures go to <DATASET>_plots/ for the paper-default run and to <DATASET>_plots/<run name>/ otherwise.

    python validate_nc.py --run-dir runs/NAME --follow   # alongside train.py: each checkpoint as it lands

With --follow it measures each checkpoint as soon as train.py writes it, waits for the next, and stops
once the checkpoint of the run's last epoch (config.json's `epochs`) is measured, or once no process
has held the run's training lock for the grace period (default 60 s: the run stopped before its end,
which it then reports with exit status 1), then draws the figures; it may start before train.py (it waits
for the run's config.json). Each checkpoint measured prints a line; on a terminal a progress bar counts them
against the checkpoints the run will write (none when stdout or stderr is redirected, as in a log).

    torchrun --nproc_per_node=K validate_nc.py ...   # each process measures its shard of each split

Under torchrun the processes' class statistics and counts are summed and process 0 writes the table
and the figures: the numbers are those of one process up to float64 rounding.
"""
from errors import ArgumentParser, UserError, interrupt_quietly, run_cli

interrupt_quietly(__name__)  # before the imports below: Ctrl-C while torch's loads (seconds) is one line too

import argparse
import contextlib
import functools
import os
import sys
import time
from pathlib import Path

import torch

import config
import datasets
import distributed
import engine
import losses
import plotting
import progress
import reports
import runs

REPRESENTATION_LAMBDAS = [step / 10 for step in range(11)]
FOLLOW_GRACE = 60.0  # seconds without a trainer after which --follow stops, by default
FOLLOW_POLL = 1.0  # seconds between --follow's looks at the run folder


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(__doc__)
    config.add_selection_arguments(parser.add_argument_group(
        "which run", "The run train.py wrote, selected by the flags train.py was given (or by its --run-dir): "
        "give the same flags. Its settings are read from its config.json; none of these changes them."),
        selecting=True)
    measurement = parser.add_argument_group("measurement", "What is measured at each checkpoint, from which data, "
                                            "on what; nc_metrics.csv in the run folder receives a row per checkpoint.")
    output = parser.add_argument_group("output", "The figures, drawn from nc_metrics.csv and log.csv.")
    plotting.add_figure_arguments(parser.add_argument_group("figure options", "How the figures look, whatever "
                                                            "they show (the same options as plotting.py's)."))
    mixup = parser.add_argument_group("the Mixup representation figure", "Drawn by --representations instead of "
                                      "measuring.")
    add = measurement.add_argument
    add("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda if available")
    add("--eval-batch-size", type=config.positive_int, default=1000,
        help="images per forward pass of the measurement (default 1000; changes speed, not results)")
    add("--data-root", type=Path, help="folder holding the datasets (default: the one the run was trained from)")
    add("--download", action="store_true", help="download the dataset into --data-root if it is missing")
    add("--recompute", action="store_true", help="measure every checkpoint again, even those in the table")
    add("--follow", type=config.positive_float, nargs="?", const=FOLLOW_GRACE, metavar="GRACE",
        help="measure each checkpoint as soon as train.py writes it, waiting for the next, until the last "
        f"epoch's is measured or no process has trained the run for GRACE seconds (default {FOLLOW_GRACE:g})")
    config.add_measurement_arguments(measurement)
    add = output.add_argument
    add("--plots-dir", type=Path, help="where the figures go (default <DATASET>_plots/[<run name>/])")
    add("--format", choices=plotting.FORMATS, default="png", help="the figures' file format (default png; pdf "
        "and svg are vector files with text kept as text)")
    add("--tensorboard", action="store_true", help="also write each checkpoint's metrics, and the figures, to "
        "<run>/tensorboard/ for TensorBoard (nc_metrics.csv stays the record)")
    add = mixup.add_argument
    add("--representations", action="store_true", help="instead of the metrics, draw the Mixup representation "
        "figure of Fisher, Meng & Papyan (2024): features of mixed training pairs of three classes in the "
        "plane of their classifiers' simplex")
    add("--representation-epochs", type=config.positive_int, nargs="+", metavar="E",
        help="with --representations: the checkpoint epochs to draw (default: the last)")
    add("--classes", type=int, nargs=3, metavar=("A", "B", "C"),
        help="with --representations: the three classes (default: three drawn at random from the run's seed)")
    add("--bn-mode", choices=("eval", "train"), help="with --representations: batch norm with "
        "its running statistics (eval, default) or each batch's (train, as Fisher et al.; the model is not changed)")
    args = parser.parse_args(argv)
    args.given = _given(parser, argv, args)
    if not args.representations and (args.representation_epochs or args.classes or args.bn_mode):
        parser.error("--representation-epochs, --classes and --bn-mode choose what --representations draws; "
                     "add --representations or drop them")
    if args.representations and args.follow:
        parser.error("--representations draws checkpoints that exist; drop --follow")
    if args.representations and (args.layers or args.test_collapse or args.adversarial):
        parser.error("--representations draws a figure instead of measuring: run --layers, --test-collapse and "
                     "--adversarial in a call of their own")
    return args


def main(args: argparse.Namespace) -> int:
    plotting.figure_style(args)  # a --style that cannot be read is refused before any measuring
    with distributed.process_group(config.resolve_device(args.device)) as device, contextlib.ExitStack() as held:
        if args.follow:
            return follow(args, device, held)
        run_dir, run_config, checkpoints, table = distributed.on_every_rank(_find_run, args, device)
        distributed.on_rank_zero(_refuse_unwritable, run_dir,
                                 args.plots_dir or runs.default_plots_dir(run_config, run_dir),
                                 not args.representations)
        if args.representations:
            return distributed.on_rank_zero(draw_representations, dict(checkpoints), run_config, run_dir, args,
                                            device) or 0
        board = distributed.on_rank_zero(runs.tensorboard_writer, run_dir) if args.tensorboard else None
        if board is not None:
            held.callback(board.close)
        todo = [(epoch, path) for epoch, path in checkpoints
                if args.recompute or epoch not in table or _lacks(table[epoch], args, run_config)]
        data = _load_data(run_config, args, device, run_dir) if todo else None
        with progress.bar(None, distributed.is_main(), total=len(todo), unit="checkpoint", desc=run_dir.name) as bar:
            skipped = measure_checkpoints(todo, run_config, run_dir, table, args, device, data, board, bar)
        return _finish(run_config, run_dir, table, len(todo) - len(skipped), skipped, args, board, device)


def follow(args: argparse.Namespace, device: torch.device, held: contextlib.ExitStack) -> int:
    """Measure the run's checkpoints as train.py writes them (see the module's --follow), then report.

    Each round first asks whether a process holds the training lock, then reads config.json and lists
    the checkpoints: a trainer found gone has finished its files by then, so the listing holds all it
    wrote. A run is done when the checkpoint of its last epoch is measured (or failed to be);
    config.json is read every round, since a run extended with a larger --epochs rewrites it. Until
    train.py has written config.json, it waits while a trainer holds the lock (loading its data), or
    for the grace period. A run that stops before its last epoch (no trainer for the grace period) has
    what it reached measured and drawn, and the exit status is 1, with the reason."""
    if distributed.world_size() > 1:
        raise UserError("--follow measures in one process; run validate_nc.py --follow without torchrun")
    requested = config.resolve_config(args)
    config.refuse_inapplicable(args, requested)
    run_dir = config.default_run_dir(requested, args)
    table, board, tried, skipped, data, idle_since, stopped = None, None, set(), [], None, None, None
    bar = held.enter_context(progress.bar(unit="checkpoint", desc=run_dir.name))
    while True:
        trainer = runs.training_process(run_dir)
        idle_since = None if trainer else idle_since or time.monotonic()
        idle = idle_since is not None and time.monotonic() - idle_since >= args.follow
        run_config = runs.read_config(run_dir)
        if run_config is None:
            if idle:
                raise UserError(f"{run_dir} has no config.json, and no train.py has held its lock for {args.follow:g} "
                                "s; start train.py with this --run-dir (or pass the folder it trains)")
            time.sleep(FOLLOW_POLL)
            continue
        if table is None:
            _refuse_contradictions(args, requested, run_config, run_dir)
            table = {row["epoch"]: row for row in runs.read_nc_metrics(run_dir)}
            board = held.enter_context(contextlib.closing(runs.tensorboard_writer(run_dir))) if args.tensorboard \
                else None
        todo = [(epoch, path) for epoch, path in runs.checkpoint_files(run_dir) if epoch not in tried
                and (args.recompute or epoch not in table or _lacks(table[epoch], args, run_config))]
        _count_checkpoints(bar, run_config, tried | set(table) - {epoch for epoch, _ in todo})
        if todo:
            data = data or _load_data(run_config, args, device, run_dir)
            skipped += measure_checkpoints(todo, run_config, run_dir, table, args, device, data, board, bar)
            tried.update(epoch for epoch, _ in todo)
            continue  # more may have landed meanwhile
        last = run_config["epochs"]
        if last in tried or last in table:
            progress.say(f"followed {run_dir} to its last epoch, {last}", file=sys.stderr)
            break
        if idle:
            reached = f"its checkpoints through epoch {max(table)} are measured" if table else \
                "it has no checkpoint to measure (it stopped or diverged before its first; train.py said which)"
            stopped = (f"no process has trained {run_dir} for {args.follow:g} s; it stopped before its last epoch "
                       f"({last}), and {reached}: run train.py again to continue it, with validate_nc.py --follow "
                       "beside it")
            break
        time.sleep(FOLLOW_POLL)
    bar.close()  # before the report's lines
    status = _finish(run_config, run_dir, table, len(tried) - len(skipped), skipped, args, board, device)
    if stopped:
        print(f"error: {stopped}", file=sys.stderr)
        return 1
    return status


def measure_checkpoints(todo: list[tuple[int, Path]], run_config: dict, run_dir: Path, table: dict,
                        args: argparse.Namespace, device: torch.device, data: tuple | None,
                        board, bar) -> list[Path]:
    """Measure each checkpoint on `data` (the run's training subset and test split, as `_load_data`
    returns them) and add its row to nc_metrics.csv (merged with the rows on disk, which another process
    may be adding too) and to `table`; returns the checkpoints that could not be measured: unreadable,
    of another run, or with weights or features that are not finite. Each is reported on one line and
    gets no row; each measured one gets a line of its numbers (by process 0), and `bar`, a progress bar
    (progress.bar), advances by one per checkpoint. `board`: TensorBoard's writer, or None."""
    if not todo:
        return []
    train, test = data.train, data.test
    skipped = []
    shown = distributed.is_main()
    for epoch, path in todo:
        try:
            row = {"epoch": epoch, **_measure(epoch, path, run_config, train, test, args, device)}
        except UserError as err:
            row = None
            skipped.append(path)
            if shown:
                progress.say(f"warning: {err}; skipped", file=sys.stderr)
        bar.update()
        if row is None:
            continue
        table.update(distributed.on_rank_zero(runs.merge_nc_metrics, run_dir, [row]) or {epoch: row})
        if board is not None:
            runs.log_scalars(board, "collapse", row)
        if shown:
            progress.say(_checkpoint_line(row))
    return skipped


def _count_checkpoints(bar, run_config: dict, behind: set[int]) -> None:
    """Set --follow's bar to the run's analysis checkpoints: as many as it will write (config.json's, which
    an extension rewrites), and as far as those of them measured already or tried by this follower."""
    expected = config.analysis_epochs(run_config)
    bar.total, bar.n = len(expected), len(behind.intersection(expected))
    bar.refresh()


def _checkpoint_line(row: dict) -> str:
    """A measured checkpoint's line of progress."""
    test = f"{row['test_acc']:.2%}" if row.get("test_acc") is not None else "-"
    return (f"checkpoint {row['epoch']:>4}: train acc {row['train_acc']:.2%}  test acc {test}  NC1 {row['nc1']:.4g}  "
            f"NCC mismatch {row['ncc_mismatch_train']:.3g}")


def _finish(run_config: dict, run_dir: Path, table: dict, measured: int, skipped: list[Path],
            args: argparse.Namespace, board, device: torch.device) -> int:
    """The figures and the TPT table (see `_report`), the checkpoints that could not be measured named;
    the exit status: 1 if there were any."""
    written = distributed.on_rank_zero(_report, run_config, run_dir, table, measured, args.plots_dir, args.format,
                                       plotting.figure_style(args))
    if device.type == "cuda" and distributed.is_main():
        print(f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} GiB")
    if board is not None and written:
        runs.log_figures(board, written, max(table))
    if skipped and distributed.is_main():
        print(f"error: {len(skipped)} checkpoint(s) could not be measured (see the warnings above): "
              f"{', '.join(map(str, skipped))}; the others were", file=sys.stderr)
    return 1 if skipped else 0


def draw_representations(checkpoints: dict[int, Path], run_config: dict, run_dir: Path,
                         args: argparse.Namespace, device: torch.device) -> int:
    """mixup_representations_epoch<E>.csv and .png in the plots folder, for each chosen checkpoint."""
    epochs = args.representation_epochs or [max(checkpoints)]
    missing = [epoch for epoch in epochs if epoch not in checkpoints]
    if missing:
        raise UserError(f"{run_dir} has no checkpoint of epoch {missing[0]}; choose among {sorted(checkpoints)}")
    classes = _representation_classes(args.classes, run_config)
    root = args.data_root or Path(run_config["data_root"])
    train = datasets.load_run_data(run_config, root, args.download, device,
                                   functools.partial(_check_data, run_config, run_dir)).train
    plots_dir = args.plots_dir or runs.default_plots_dir(run_config, run_dir)
    for epoch in epochs:
        state = runs.load_checkpoint(checkpoints[epoch], epoch)
        model = engine.build_model(state["config"], device)
        model.load_state_dict(state["model"])
        rows = engine.mixup_representations(model, train, state["config"], classes, REPRESENTATION_LAMBDAS,
                                            bn_mode=args.bn_mode or "eval")
        table = plots_dir / f"mixup_representations_epoch{epoch}.csv"
        plots_dir.mkdir(parents=True, exist_ok=True)
        runs.write_csv(table, rows, engine.REPRESENTATION_COLUMNS)
        print(plotting.plot_representations(table, table.with_suffix(f".{args.format}"), plotting.figure_style(args)))
    return 0


def _find_run(args: argparse.Namespace, device: torch.device) -> tuple[Path, dict, list[tuple[int, Path]], dict]:
    """The run folder, its config, its checkpoints and the rows of its table, by epoch."""
    requested = config.resolve_config(args)
    config.refuse_inapplicable(args, requested)
    run_dir = runs.usable_run_dir(config.default_run_dir(requested, args))
    run_config = _run_config(run_dir, args, requested)
    _refuse_contradictions(args, requested, run_config, run_dir)
    checkpoints = runs.checkpoint_files(run_dir)
    if not checkpoints:
        raise UserError(f"{run_dir} has no checkpoints yet; train first: python train.py --run-dir {run_dir} ...")
    return run_dir, run_config, checkpoints, {row["epoch"]: row for row in runs.read_nc_metrics(run_dir)}


def _load_data(run_config: dict, args: argparse.Namespace, device: torch.device, run_dir: Path) -> datasets.RunData:
    """The run's training subset and test split, once they are found to be those it was trained on (see
    `_check_data`); under torchrun process 0 downloads, then each process reads."""
    root = args.data_root or Path(run_config["data_root"])
    if args.download:
        distributed.on_rank_zero(datasets.fetch, run_config["dataset"], root)
    return distributed.on_every_rank(datasets.load_run_data, run_config, root, args.download, device,
                                     functools.partial(_check_data, run_config, run_dir))


def _check_data(run_config: dict, run_dir: Path, fingerprint: dict) -> None:
    """Refuse to measure a run on other data than it was trained on (its config.json's data_fingerprint),
    naming what changed; a run trained before runs recorded their data is measured with a warning."""
    warning = datasets.refuse_other_data(run_config.get("data_fingerprint"), fingerprint, run_config["dataset"],
                                         run_dir, "measured")
    if warning and distributed.is_main():
        print(f"warning: {warning}", file=sys.stderr)


def _refuse_contradictions(args: argparse.Namespace, requested: dict, run_config: dict, run_dir: Path) -> None:
    """Refuse selection flags given beside --run-dir that select another run than the folder holds."""
    found = config.contradictions(requested, set(args.given), run_config) if args.run_dir else []
    if found:
        raise UserError(f"{run_dir} holds another run than {', '.join(found)} select(s); drop those flags to "
                        "measure it, or drop --run-dir to measure the run they select")


def _given(parser: argparse.ArgumentParser, argv: list[str] | None, args: argparse.Namespace) -> frozenset[str]:
    """The dests of the flags given on the command line: argparse sets a default only where the namespace it
    parses into lacks the attribute, so what a parse into one holding a marker changes was given."""
    unset = object()
    probe = parser.parse_args(argv, argparse.Namespace(**dict.fromkeys(vars(args), unset)))
    return frozenset(dest for dest, value in vars(probe).items() if value is not unset)


def _measure(epoch: int, path: Path, run_config: dict, train: engine.Split, test: engine.Split,
             args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """The numbers of the checkpoint of `epoch`; a UserError if it cannot be read (or is corrupt), holds
    another epoch, belongs to another run or holds weights that are not finite (the same on every process
    under torchrun, which all skip it together)."""
    error = None
    try:
        state = runs.load_checkpoint(path, epoch)
    except UserError as err:
        error = str(err)
    error = distributed.first_message(error)
    if error is not None:
        raise UserError(error)
    differences = config.result_differences(state["config"], run_config)
    if differences:
        raise UserError(f"{path} belongs to another run than its folder's config.json ({'; '.join(differences)}); "
                        "move it to its own run folder")
    if not all(tensor.isfinite().all() for tensor in state["model"].values() if tensor.is_floating_point()):
        raise UserError(f"{path} holds weights that are not finite (NaN or Inf): the run had diverged")
    model = engine.build_model(state["config"], device)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise UserError(f"{path} does not fit the network its config describes ({str(err).splitlines()[0]})") from None
    measured = engine.measure_collapse(model, losses.loss_from_config(state["config"]), train, test, state["config"],
                                       args.eval_batch_size, layers=args.layers, test_collapse=args.test_collapse)
    if args.adversarial:
        measured |= engine.adversarial_robustness(model, test, state["config"], args.adversarial_samples)
    return measured


def _refuse_unwritable(run_dir: Path, plots_dir: Path, measuring: bool) -> None:
    """Refuse, before anything is measured, a plots folder that cannot be one and (when measuring) a run
    folder whose tables cannot be written: a read-only folder, something else where the lock file goes."""
    runs.usable_folder(plots_dir, "--plots-dir")
    if measuring:
        with runs.locked(run_dir / runs.TABLES_LOCK):
            pass
        if not os.access(run_dir, os.W_OK):
            raise UserError(f"{run_dir} is read-only, and nc_metrics.csv and summary.json are written there; make "
                            "it writable, or measure a copy of it")


def _lacks(row: dict, args: argparse.Namespace, run_config: dict) -> bool:
    """Whether a row of the table lacks a measurement asked for (or, of an imbalanced run, its Minority
    Collapse columns), and so is measured again."""
    return reports.lacks_measurements(row, run_config, args.layers, args.test_collapse, args.adversarial)


def _report(run_config: dict, run_dir: Path, table: dict, measured: int, plots_dir: Path | None,
            figure_format: str, style: plotting.FigureStyle) -> list[Path]:
    """summary.json, the figures and the TPT table of a run with measurements, and a line saying what was
    done; the figures written."""
    if not table:
        return []
    runs.write_summary(run_dir)  # also where it was lost: a study counts a run done once it is there
    plots_dir = plots_dir or runs.default_plots_dir(run_config, run_dir)
    written = plotting.plot_run(run_dir, plots_dir, f".{figure_format}", style)
    summary = reports.tpt_table(run_dir)
    runs.write_text(plots_dir / reports.TPT_TABLE, summary)
    print(summary)
    print(f"{measured} checkpoint(s) measured, {len(table)} in {run_dir / 'nc_metrics.csv'}; "
          f"{len(written) + 1} files in {plots_dir}/")
    return written


def _representation_classes(chosen: list[int] | None, run_config: dict) -> list[int]:
    num_classes = run_config["num_classes"]
    if chosen is None:
        generator = torch.Generator().manual_seed(run_config["seed"])
        return sorted(torch.randperm(num_classes, generator=generator)[:3].tolist())
    if len(set(chosen)) != 3 or not all(0 <= label < num_classes for label in chosen):
        raise UserError(f"--classes takes three different classes in 0..{num_classes - 1}, not {chosen}")
    return chosen


def _run_config(run_dir: Path, args: argparse.Namespace, requested: dict) -> dict:
    """The run's config.json; for a folder that is not there, what is there instead and how to train it."""
    run_config = runs.read_config(run_dir) if run_dir.is_dir() else None
    if run_config is None:
        data = "" if requested["dataset"] == "synthetic" else \
            f" --data-root {args.data_root}" if args.data_root else \
            " --download (or --data-root DIR, a folder with a copy)"
        train_flags = config.selection_flags(requested) + (["--run-dir", str(run_dir)] if args.run_dir else [])
        raise UserError(f"no run folder at {run_dir}; {_nearest_runs(run_dir.parent, requested)}train it with: "
                        f"python train.py {' '.join(train_flags)}{data}")
    return run_config


def _nearest_runs(folder: Path, requested: dict, count: int = 3) -> str:
    """The runs of the requested dataset in `folder`, nearest settings first, with the flags that select
    them, as the start of a sentence ("" if there are none)."""
    found = []
    for candidate in sorted(folder.iterdir()) if folder.is_dir() else []:
        try:
            settings = runs.read_config(candidate) if candidate.is_dir() else None
        except UserError:
            continue
        if settings and settings["dataset"] == requested["dataset"]:
            chosen, theirs = config.selection_flags(requested), config.selection_flags(settings)
            found.append((len(set(chosen) ^ set(theirs)), candidate, theirs))
    if not found:
        return ""
    shown = [f"{candidate} ({' '.join(flags)})" for _, candidate, flags in sorted(found)[:count]]
    return f"runs of {requested['dataset']} there: {', '.join(shown)}; pass their flags or --run-dir, or "


if __name__ == "__main__":
    sys.exit(run_cli(main, parse_args))
