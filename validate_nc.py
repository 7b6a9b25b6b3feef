"""Measure Neural Collapse at every analysis checkpoint of a run, then draw the paper's Figures 2-7
(and Figure 9, the later papers' measures; see docs/other_measures.md).

    python validate_nc.py --dataset CIFAR10        # the run `python train.py --dataset CIFAR10` made
    python validate_nc.py --run-dir runs/NAME      # any run folder

For each checkpoint, in epoch order, the model is rebuilt from the checkpoint's own config, run once
in strict float32 over the class-balanced training subset it was trained on (clean: no augmentation,
no Mixup) and once over the test split, and a row is added to <run>/nc_metrics.csv. Checkpoints already
in the table are skipped (unless --recompute), so a run still training can be validated again later.
Figures go to <DATASET>_plots/ for the paper-default run and to <DATASET>_plots/<run name>/ otherwise.

    torchrun --nproc_per_node=K validate_nc.py ...   # each process measures its shard of each split

Under torchrun the processes' class statistics and counts are summed and process 0 writes the table
and the figures: the numbers are those of one process up to float64 rounding.
"""
import argparse
import contextlib
import sys
from pathlib import Path

import torch
from tqdm import tqdm

import config
import datasets
import distributed
import engine
import losses
import plotting
import runs
from errors import ArgumentParser, UserError, run_cli
from nc_metrics import OTHER_KEYS

REPRESENTATION_LAMBDAS = [step / 10 for step in range(11)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(__doc__)
    config.add_selection_arguments(parser)
    add = parser.add_argument
    add("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda if available")
    add("--eval-batch-size", type=config.positive_int, default=1000,
        help="images per forward pass of the measurement (default 1000; changes speed, not results)")
    add("--plots-dir", type=Path, help="where the figures go (default <DATASET>_plots/[<run name>/])")
    add("--tensorboard", action="store_true", help="also write each checkpoint's metrics, and the figures, to "
        "<run>/tensorboard/ for TensorBoard (nc_metrics.csv stays the record)")
    add("--format", choices=plotting.FORMATS, default="png", help="the figures' file format (default png; pdf "
        "and svg are vector files with text kept as text)")
    add("--recompute", action="store_true", help="measure every checkpoint again, even those in the table")
    add("--data-root", type=Path, help="folder holding the datasets (default: the one the run was trained from)")
    add("--download", action="store_true", help="download the dataset into --data-root if it is missing")
    add("--layers", action="store_true", help="also NC1 after every stage of the network (nc1_<stage> columns, "
        "layerwise_nc1.png), from the same forward pass")
    add("--test-collapse", action="store_true", help="also the collapse of the test features around their own "
        "class means (nc1_test and the other feature metrics with a _test suffix), drawn beside the train "
        "curves of Figures 2-6; from the test pass that runs anyway")
    add("--adversarial", action="store_true", help="also the paper's Figure 8: DeepFool's robustness on a fixed "
        "sample of test images (deepfool_* columns, fig8_adversarial_robustness.png); a separate pass")
    add("--adversarial-samples", type=config.positive_int, default=100, metavar="N",
        help="test images DeepFool attacks at every checkpoint, drawn with the run's seed (default 100)")
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
    if not args.representations and (args.representation_epochs or args.classes or args.bn_mode):
        parser.error("--representation-epochs, --classes and --bn-mode choose what --representations draws; "
                     "add --representations or drop them")
    if args.representations and (args.layers or args.test_collapse or args.adversarial):
        parser.error("--representations draws a figure instead of measuring: run --layers, --test-collapse and "
                     "--adversarial in a call of their own")
    return args


def main(args: argparse.Namespace) -> int:
    with distributed.process_group(config.resolve_device(args.device)) as device, contextlib.ExitStack() as held:
        run_dir, run_config, checkpoints, table = distributed.on_every_rank(_find_run, args, device)
        if args.representations:
            return distributed.on_rank_zero(draw_representations, dict(checkpoints), run_config, run_dir, args,
                                            device) or 0
        board = distributed.on_rank_zero(runs.tensorboard_writer, run_dir) if args.tensorboard else None
        if board is not None:
            held.callback(board.close)
        todo = [(epoch, path) for epoch, path in checkpoints
                if args.recompute or epoch not in table or _lacks(table[epoch], args)]
        skipped = measure_checkpoints(todo, run_config, run_dir, table, args, device, board)
        written = distributed.on_rank_zero(_report, run_config, run_dir, table, len(todo) - len(skipped),
                                           args.plots_dir, args.format)
        if board is not None and written:
            runs.log_figures(board, written, max(table))
        if skipped and distributed.is_main():
            print(f"error: {len(skipped)} checkpoint(s) could not be measured (see the warnings above): "
                  f"{', '.join(map(str, skipped))}; the others were", file=sys.stderr)
    return 1 if skipped else 0


def measure_checkpoints(todo: list[tuple[int, Path]], run_config: dict, run_dir: Path, table: dict,
                        args: argparse.Namespace, device: torch.device, board=None) -> list[Path]:
    """Measure each checkpoint and add its row to nc_metrics.csv (merged with the rows on disk, which
    another process may be adding too) and to `table`; returns the checkpoints that could not be measured:
    unreadable, of another run, or with weights or features that are not finite. Each is reported on
    one line and gets no row."""
    if not todo:
        return []
    train, test, _ = _load_data(run_config, args, device)
    skipped = []
    progress = tqdm(todo, unit="checkpoint", desc=run_dir.name, dynamic_ncols=True, disable=not distributed.is_main())
    for epoch, path in progress:
        try:
            row = {"epoch": epoch, **_measure(path, run_config, train, test, args, device)}
        except UserError as err:
            if distributed.is_main():
                tqdm.write(f"warning: {err}; skipped", file=sys.stderr)
            skipped.append(path)
            continue
        table.update(distributed.on_rank_zero(runs.merge_nc_metrics, run_dir, [row]) or {epoch: row})
        if board is not None:
            runs.log_scalars(board, "collapse", row)
        progress.set_postfix(epoch=epoch, nc1=f"{row['nc1']:.3g}", test_acc=f"{row['test_acc']:.2%}")
    return skipped


def draw_representations(checkpoints: dict[int, Path], run_config: dict, run_dir: Path,
                         args: argparse.Namespace, device: torch.device) -> int:
    """mixup_representations_epoch<E>.csv and .png in the plots folder, for each chosen checkpoint."""
    epochs = args.representation_epochs or [max(checkpoints)]
    missing = [epoch for epoch in epochs if epoch not in checkpoints]
    if missing:
        raise UserError(f"{run_dir} has no checkpoint of epoch {missing[0]}; choose among {sorted(checkpoints)}")
    classes = _representation_classes(args.classes, run_config)
    root = args.data_root or Path(run_config["data_root"])
    train, _, _ = datasets.load_run_data(run_config["dataset"], root, run_config["samples_per_class"],
                                         run_config["seed"], args.download, device, run_config.get("image_size"))
    plots_dir = args.plots_dir or default_plots_dir(run_config, run_dir)
    for epoch in epochs:
        state = runs.load_checkpoint(checkpoints[epoch], device)
        model = engine.build_model(state["config"], device)
        model.load_state_dict(state["model"])
        rows = engine.mixup_representations(model, train, state["config"], classes, REPRESENTATION_LAMBDAS,
                                            bn_mode=args.bn_mode or "eval")
        table = plots_dir / f"mixup_representations_epoch{epoch}.csv"
        plots_dir.mkdir(parents=True, exist_ok=True)
        runs.write_csv(table, rows, engine.REPRESENTATION_COLUMNS)
        print(plotting.plot_representations(table))
    return 0


def default_plots_dir(run_config: dict, run_dir: Path) -> Path:
    """<DATASET>_plots/ for the paper-default run, <DATASET>_plots/<run name>/ for any other."""
    base = Path(f"{datasets.label(run_config['dataset'])}_plots")
    return base if run_dir.name == config.paper_run_name(run_config["dataset"]) else base / run_dir.name


def _find_run(args: argparse.Namespace, device: torch.device) -> tuple[Path, dict, list[tuple[int, Path]], dict]:
    """The run folder, its config, its checkpoints and the rows of its table, by epoch."""
    requested = config.resolve_config(args)
    run_dir = config.default_run_dir(requested, args)
    run_config = _run_config(run_dir, args, requested)
    checkpoints = runs.checkpoint_files(run_dir)
    if not checkpoints:
        raise UserError(f"{run_dir} has no checkpoints yet; train first: python train.py --run-dir {run_dir} ...")
    return run_dir, run_config, checkpoints, {row["epoch"]: row for row in runs.read_nc_metrics(run_dir)}


def _load_data(run_config: dict, args: argparse.Namespace,
               device: torch.device) -> tuple[engine.Split, engine.Split, int]:
    """The run's training subset and test split; under torchrun process 0 downloads, then each process reads."""
    root = args.data_root or Path(run_config["data_root"])
    if args.download:
        distributed.on_rank_zero(datasets.fetch, run_config["dataset"], root)
    return distributed.on_every_rank(datasets.load_run_data, run_config["dataset"], root,
                                     run_config["samples_per_class"], run_config["seed"], args.download, device,
                                     run_config.get("image_size"))


def _measure(path: Path, run_config: dict, train: engine.Split, test: engine.Split, args: argparse.Namespace,
             device: torch.device) -> dict[str, float]:
    """The numbers of one checkpoint; a UserError if it cannot be read, belongs to another run or holds
    weights that are not finite (the same on every process under torchrun, which all skip it together)."""
    error = None
    try:
        state = runs.load_checkpoint(path, device)
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


def _lacks(row: dict, args: argparse.Namespace) -> bool:
    """Whether a row of the table lacks a measurement asked for, and so is measured again."""
    present = {key for key, value in row.items() if value is not None}
    return (not present.issuperset(OTHER_KEYS)  # measured before the field's other measures existed
            or (args.test_collapse and "nc1_test" not in present)
            or (args.adversarial and "deepfool_robustness" not in present)
            or (args.layers and not runs.stage_columns([row])))


def _report(run_config: dict, run_dir: Path, table: dict, measured: int, plots_dir: Path | None,
            figure_format: str) -> list[Path]:
    """The figures and the TPT table of a run with measurements, and a line saying what was done; the
    figures written."""
    if not table:
        return []
    plots_dir = plots_dir or default_plots_dir(run_config, run_dir)
    written = plotting.plot_run(run_dir, plots_dir, f".{figure_format}")
    summary = plotting.tpt_table(run_dir)
    runs.write_text(plots_dir / "tpt_table.md", summary)
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
            f" --data-root {args.data_root}" if args.data_root else " --download (or --data-root DIR, a folder with a copy)"
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
