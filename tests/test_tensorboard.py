"""--tensorboard: the numbers of log.csv and nc_metrics.csv, read back with TensorBoard's own event reader."""
import pytest

import runs
import train
import validate_nc

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


@pytest.mark.slow
def test_train_and_validate_write_their_tables_as_scalars_and_the_figures_as_images(tmp_path):
    run_dir = tmp_path / "run"
    train.main(train.parse_args(["--dataset", "synthetic", "--width", "4", "--epochs", "2", "--num-checkpoints", "2",
                                 "--samples-per-class", "10", "--device", "cpu", "--run-dir", str(run_dir),
                                 "--tensorboard"]))
    validate_nc.main(validate_nc.parse_args(["--run-dir", str(run_dir), "--device", "cpu", "--tensorboard",
                                             "--plots-dir", str(tmp_path / "plots")]))
    events = event_accumulator.EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    log, measured = runs.read_log(run_dir), runs.read_nc_metrics(run_dir)
    for group, rows in (("train", log), ("collapse", measured)):
        for column in rows[0]:
            if column != "epoch":
                scalars = events.Scalars(f"{group}/{column}")
                assert [event.step for event in scalars] == [row["epoch"] for row in rows]
                assert [event.value for event in scalars] == pytest.approx([row[column] for row in rows], rel=1e-6)
    assert {"panel", "fig6_nc1", "training_curves"} <= set(events.Tags()["images"])


def test_without_the_package_the_flag_is_refused_on_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "torch.utils.tensorboard", None)  # as if not installed
    with pytest.raises(runs.UserError, match=r"--tensorboard needs the tensorboard package: pip install"):
        runs.tensorboard_writer(tmp_path)
