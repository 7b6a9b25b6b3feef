"""Benchmark of measure_features.py at many classes: time and peak resident memory, how time grows with the
number of classes K, and the tiled pairwise measures against the dense computation they replace.

    python bench/large_k.py                          # K = 1,000 .. 30,000, d = 1,024, N = 300,000, 2 threads
    python bench/large_k.py --out results/large_k/benchmark.csv
    python bench/large_k.py --quick                  # tiny sizes, seconds (the test suite runs this)

For each K it writes synthetic float32 features into a temporary folder of .npy files (deleted after): N
samples with balanced labels, random class means plus noise, a classifier near the means and N / 10 held-out
features. Then, each in a fresh process with --threads torch threads:

    measure   `measure_features.py FOLDER --out ...`, everything it does (the statistics pass over the
              memory-mapped features, every measure, the classifier pass over the training and held-out
              features): wall time and peak resident set (Linux's VmHWM, which counts mapped file pages).
    tiled     the statistics pass, then nc_metrics' `metrics_from_stats`: the time of the metrics alone.
    dense     the same pass, then the pairwise measures as nc_metrics.py computed them before its tiles: whole
              C x C matrices, and a difference vector per pair for the CDNV and the energy (C^2 d / 2 numbers,
              twice); run only where that fits --dense-limit GiB and half the memory available. Reported beside `tiled`:
              time, peak resident set and
              the largest relative difference of the pairwise measures.

Every line printed is also a row of --out's CSV, with the machine's one-minute load average when it began.
"""
import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
FULL = {"classes": [1000, 3000, 10000, 30000], "dim": 1024, "samples": 300_000}
QUICK = {"classes": [20, 60], "dim": 16, "samples": 600}
PAIRWISE = ("equiangular_means", "equiangular_weights", "maxangle_means", "maxangle_weights", "cdnv",
            "etf_error_means", "etf_error_weights", "wh_alignment", "hyperspherical_energy_means",
            "gnc2_log_distance_var")
COLUMNS = ["what", "classes", "dim", "samples", "threads", "seconds", "peak_rss_gib", "max_rel_diff", "load"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: K = 20 and 60, d = 16, N = 600")
    parser.add_argument("--classes", type=int, nargs="+", help=f"the values of K (default {FULL['classes']})")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each process (default 2)")
    parser.add_argument("--dense-limit", type=float, default=8.0, help="GiB the dense computation may take, at "
                        "most half the memory available when it starts (default 8)")
    parser.add_argument("--out", type=Path, help="also write the rows to this CSV file")
    parser.add_argument("--child", nargs=3, metavar=("WHAT", "FOLDER", "THREADS"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> int:
    if args.child:
        return child(*args.child)
    sizes = QUICK if args.quick else FULL
    rows = []
    for classes in args.classes or sizes["classes"]:
        folder = Path(tempfile.mkdtemp(prefix=f"large_k_{classes}_"))
        try:
            write_features(folder, classes, sizes["dim"], sizes["samples"])
            common = {"classes": classes, "dim": sizes["dim"], "samples": sizes["samples"], "threads": args.threads}
            rows.append(report({"what": "measure", **common, **run_child("measure", folder, args.threads)}))
            dense_bytes = 2 * 8 * classes * classes * sizes["dim"] / 2  # a difference per pair, and its square
            if dense_bytes <= min(args.dense_limit * 2 ** 30, available_memory() / 2):
                tiled = run_child("tiled", folder, args.threads)
                dense = run_child("dense", folder, args.threads)
                difference = max(abs(dense["values"][key] - tiled["values"][key]) / abs(dense["values"][key])
                                 for key in PAIRWISE)
                rows += [report({"what": name, **common, **values, "max_rel_diff": difference})
                         for name, values in (("tiled", tiled), ("dense", dense))]
        finally:
            shutil.rmtree(folder)
        if args.out:  # after each K: a long run stopped early keeps what it measured
            write_rows(args.out, rows)
    measured = [row for row in rows if row["what"] == "measure"]
    if len(measured) > 1:
        first, last = measured[0], measured[-1]
        print(f"growth: K x{last['classes'] / first['classes']:.0f} -> time x{last['seconds'] / first['seconds']:.1f}")
    return 0


def write_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def report(row: dict) -> dict:
    """Print a row as one line, and return it."""
    print(", ".join(f"{key} {row[key]:.4g}" if isinstance(row[key], float) else f"{key} {row[key]}"
                    for key in COLUMNS if row.get(key) is not None), flush=True)
    return row


def write_features(folder: Path, classes: int, dim: int, samples: int, seed: int = 0) -> None:
    """features.npy, labels.npy, weight.npy, bias.npy, test_features.npy and test_labels.npy, in chunks."""
    generator = np.random.default_rng(seed)
    means = generator.standard_normal((classes, dim), dtype=np.float32)
    weight = means + 0.1 * generator.standard_normal((classes, dim), dtype=np.float32)
    np.save(folder / "weight.npy", weight)
    np.save(folder / "bias.npy", -0.5 * (weight.astype(np.float64) ** 2).sum(axis=1))
    for prefix, count in (("", samples), ("test_", samples // 10)):
        labels = generator.permutation(np.arange(count) % classes)
        np.save(folder / f"{prefix}labels.npy", labels)
        features = np.lib.format.open_memmap(folder / f"{prefix}features.npy", "w+", np.float32, (count, dim))
        for start in range(0, count, 65536):
            chunk = labels[start:start + 65536]
            features[start:start + len(chunk)] = means[chunk] + generator.standard_normal((len(chunk), dim),
                                                                                           dtype=np.float32)
        features.flush()
        del features


def run_child(what: str, folder: Path, threads: int) -> dict:
    load = os.getloadavg()[0]
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    done = subprocess.run([sys.executable, __file__, "--child", what, str(folder), str(threads)], env=environment,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the {what} process failed:\n{done.stderr}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "load": load}


def child(what: str, folder: str, threads: str) -> int:
    import torch
    torch.set_num_threads(int(threads))
    started = time.perf_counter()
    if what == "measure":
        import measure_features
        out = Path(folder) / "out"
        measure_features.main(measure_features.parse_args([folder, "--out", str(out)]))
        values = {}
    else:
        import nc_metrics
        from feature_files import open_checkpoint
        checkpoint = open_checkpoint(Path(folder))
        weight = checkpoint.single("weight").whole().to(torch.float64)
        stats = nc_metrics.FeatureStats(len(weight), weight.shape[1])
        for features, labels in checkpoint.parts():
            for h, y in zip(features.windows(8192), labels.windows(8192)):
                stats.update(h, y)
        started = time.perf_counter()
        values = (nc_metrics.metrics_from_stats if what == "tiled" else dense_pairwise)(stats, weight)
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "peak_rss_gib": peak_rss() / 2 ** 30, "values": values}))
    return 0


def dense_pairwise(stats, weight) -> dict:
    """The pairwise measures as nc_metrics.py computed them before its tiles: every C x C matrix whole, and the
    CDNV and the energies from a difference vector per pair of classes."""
    import torch
    centred = stats.class_means() - stats.global_mean()
    variances = stats.class_variances()

    def cosines(vectors):
        unit = vectors / vectors.norm(dim=1, keepdim=True)
        return (unit @ unit.T)[~torch.eye(len(vectors), dtype=torch.bool)]

    def etf_error(gram):
        classes = len(gram)
        simplex = torch.eye(classes, dtype=gram.dtype) - 1.0 / classes
        return (gram / gram.norm() - simplex / (classes - 1) ** 0.5).norm().item()

    classes = len(centred)
    first, second = torch.triu_indices(classes, classes, offset=1)
    distances = (centred[first] - centred[second]).pow(2).sum(dim=1)
    cdnv = ((variances[first] + variances[second]) / (2 * distances)).mean().item()
    del distances
    unit = centred / centred.norm(dim=1, keepdim=True)
    unit_distances = (unit[first] - unit[second]).norm(dim=1)
    means_cosines, weight_cosines = cosines(centred), cosines(weight)
    return {"equiangular_means": means_cosines.std().item(), "equiangular_weights": weight_cosines.std().item(),
            "maxangle_means": (means_cosines + 1 / (classes - 1)).abs().mean().item(),
            "maxangle_weights": (weight_cosines + 1 / (classes - 1)).abs().mean().item(), "cdnv": cdnv,
            "etf_error_means": etf_error(centred @ centred.T), "etf_error_weights": etf_error(weight @ weight.T),
            "wh_alignment": etf_error(weight @ centred.T),
            "hyperspherical_energy_means": unit_distances.reciprocal().mean().item(),
            "gnc2_log_distance_var": unit_distances.reciprocal().log().var(unbiased=False).item()}


def available_memory() -> int:
    """The bytes of memory available to a new process (MemAvailable)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def peak_rss() -> int:
    """The process's peak resident set in bytes (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
