"""Seconds per checkpoint of validate_nc.py's measurement against a bare forward pass over the same images.

    python bench/validate.py                                # CPU: resnet18 width 16, synthetic
    python bench/validate.py --device cuda --width 64
    python bench/validate.py --dataset CIFAR10 --data-root /tmp/cifar --samples-per-class 200

Both sides run one freshly initialised model (channels_last, eval mode, inference mode, strict
float32: no autocast, no TF32) over the training subset and the test split, --batch-size images at a
time:

    measure_collapse  engine.measure_collapse, what validate_nc.py does per checkpoint once the
                      checkpoint is loaded: each batch indexed from the uint8 split on the device and
                      normalised there, FeatureStats, the train features kept for NCC, loss, accuracy,
                      the test pass's NCC and calibration bins, then the NC metrics and one sync.
    + layers, test    the same with validate_nc.py --layers --test-collapse: one FeatureStats per stage
                      in the train pass and one for the test features, in the same passes.
    bare forward      the same images normalised once beforehand, model(x) per batch, logits discarded.

Loading the checkpoint, writing nc_metrics.csv and plotting are left out of all three. Targets: at most
1.15x for measure_collapse, 1.3x for the extended measurement. With --adversarial N it also times
DeepFool on N test images (validate_nc.py --adversarial --adversarial-samples N), once.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import config  # noqa: E402
import engine  # noqa: E402
import losses  # noqa: E402
from bench import common  # noqa: E402

TARGET, EXTENDED_TARGET = 1.15, 1.3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_arguments(parser)
    parser.add_argument("--batch-size", type=config.positive_int, default=1000,
                        help="images per forward pass, as validate_nc.py's --eval-batch-size (default 1000)")
    parser.add_argument("--adversarial", type=config.positive_int, metavar="N",
                        help="also time DeepFool on N test images, as validate_nc.py --adversarial-samples N")
    return common.parse(parser, argv)


def main(args: argparse.Namespace) -> int:
    # The training precision never reaches the measurement, which is strict float32 whatever it is.
    work = common.load_workload(args, "fp32")
    settings = work.settings
    torch.manual_seed(settings["seed"])
    model = engine.build_model(settings, work.device).eval()
    loss_fn = losses.loss_from_config(settings)
    batches = (common.fixed_batches(work.train, settings, args.batch_size)
               + common.fixed_batches(work.test, settings, args.batch_size))
    seconds = common.interleaved_seconds({
        "measure_collapse": lambda: engine.measure_collapse(model, loss_fn, work.train, work.test, settings,
                                                            args.batch_size),
        "extended": lambda: engine.measure_collapse(model, loss_fn, work.train, work.test, settings,
                                                    args.batch_size, layers=True, test_collapse=True),
        "bare forward": lambda: _strict_forward(model, batches),
    }, args.repeats, not args.quick, work.device)

    measured, bare = common.median(seconds["measure_collapse"]), common.median(seconds["bare forward"])
    extended = common.median(seconds["extended"])
    what = common.describe(work, f"batch {args.batch_size}", "strict fp32", f"median of {args.repeats}")
    print(f"checkpoint measurement ({what}): measure_collapse {measured:.3g} s vs bare forward {bare:.3g} s "
          f"({common.ratio(measured, bare)}, target <= {TARGET:.2f}x); with --layers --test-collapse "
          f"{extended:.3g} s ({common.ratio(extended, measured)} the plain measurement, "
          f"target <= {EXTENDED_TARGET:.2f}x)")
    if args.adversarial:
        deepfool = common.seconds_of(lambda: engine.adversarial_robustness(model, work.test, settings,
                                                                           args.adversarial),
                                     work.device)
        print(f"DeepFool on {args.adversarial} test images: {deepfool:.3g} s per checkpoint")
    return 0


def _strict_forward(model: torch.nn.Module, batches: common.Batches) -> None:
    with engine.strict_float32():
        common.forward_pass(model, batches, "fp32")


if __name__ == "__main__":
    sys.exit(main(parse_args()))
