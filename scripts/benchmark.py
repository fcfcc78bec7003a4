#!/usr/bin/env python
# size: a maintainer script; each measurement beside the others it is compared with
"""Speed and memory of LungSeg, measured (never asserted in tests).

    .venv/bin/python scripts/benchmark.py                          # this checkout: 1024² PNGs, end to end
    .venv/bin/python scripts/benchmark.py --baseline /tmp/old      # and an older checkout, in the same run
    .venv/bin/python scripts/benchmark.py --memory-images 1000     # also: peak memory of a 1,000-image batch
    .venv/bin/python scripts/benchmark.py --orientation-cost       # also: the run without the orientation check
    .venv/bin/python scripts/benchmark.py --models --training      # also: every model's forward rate; training
    .venv/bin/python scripts/benchmark.py --install-size python3.11  # also: the venv `pip install` makes

Inputs are made from the bundled demo radiographs, resized to 1024² 8-bit PNGs, in a temporary folder. For this
checkout it reports images/s end to end (model loaded, startup excluded), the bare forward rate at the same batch
size (before and after the run, averaged) and their ratio, and the CPU milliseconds per image of every stage, each
alone on one thread, with the upper bound they set on any pipeline's end-to-end rate on this machine's cores.

`--baseline DIR` (a checkout of another version, e.g. `git worktree add /tmp/old REV`) measures both versions the
same way, through the command line in fresh processes, alternating so that a shared machine's drift hits both:
the cold start of `lungseg segment one.png` beside `python -c "import numpy, scipy.ndimage, SimpleITK"`, end-to-end
images/s, and with `--memory-images` the peak memory (PSS of the whole process tree). `--orientation-cost` adds
this checkout with `--no-orientation-check` to those alternating runs: the orientation check's cost on the same
code.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

# Timings that the package's docstrings used to quote, measured on a 2-core x86-64 machine (CPU, one thread unless
# said). They explain choices in the code; rerun this script to see where a machine stands today.
# - postprocess._resize_uint8: resizing the probabilities as 8-bit bands (Pillow) is about 20x faster than in
#   float32 (NumPy or torch), and equal to torch's 8-bit resize within one level.
# - preprocess.resize: sparse separable weights; 1024² to 256² with antialiasing about 12 ms on one thread.
# - labels.clean_labelmap: SciPy's labelling called directly is 2.5x faster at 256² than MONAI's
#   KeepLargestConnectedComponent followed by binary_fill_holes.
# - preprocess.percentiles: one NumPy partition is 3x faster than sorting, or than kthvalue per statistic.
# - workers.helper_process: giving the model only the cores that the helpers left over held a 2-core machine at
#   the one-thread forward rate (32 images/s, against 57 with the helpers at a lower priority).
# - runtime.open_session: ONNX Runtime's CPU memory arena off gave the same rate as on (NOTES: 45-52 images/s at
#   batch 8, 256², 2 threads, either way) and holds no memory between batches.

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
IMPORT_REFERENCE = "import numpy, scipy.ndimage, SimpleITK"


def make_inputs(folder: Path, count: int, size: int) -> list[Path]:
    from lungseg.samples import sample_pngs

    folder.mkdir(parents=True, exist_ok=True)
    sources = []
    for i, png in enumerate(sample_pngs()):
        image = sitk.ReadImage(str(png))
        spacing = [s * image.GetSize()[0] / size for s in image.GetSpacing()]
        resized = sitk.Resample(image, [size, size], sitk.Transform(), sitk.sitkLinear, image.GetOrigin(), spacing)
        path = folder / f"source{i}.png"
        sitk.WriteImage(sitk.Cast(resized, sitk.sitkUInt8), str(path))
        sources.append(path)
    paths = []
    for i in range(count):  # distinct files, each decoded for real
        path = folder / f"image{i:05d}.png"
        if not path.exists():
            os.link(sources[i % len(sources)], path)
        paths.append(path)
    return paths


def bare_forward_rate(segmenter, batch_size: int, seconds: float = 10.0) -> float:
    x = np.random.default_rng(0).random((batch_size, 1, segmenter.size, segmenter.size), dtype=np.float32)
    segmenter.probabilities(x)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        segmenter.probabilities(x)
        n += batch_size
    return n / (time.perf_counter() - t0)


def stage_cpu_ms(segmenter, path: Path, scratch: Path, repeats: int = 30) -> dict:
    """CPU milliseconds per image of each stage of `lungseg segment`, each stage alone (`segmenter` on one
    thread)."""
    from lungseg.inference.labels import lung_areas
    from lungseg.inference.postprocess import postprocess
    from lungseg.inference.preprocess import model_input
    from lungseg.io.radiograph import read_radiograph, write_labelmap

    try:  # QC as the batch runs it: the rules and the predicted quality of the card's qc block (issue 12)
        from lungseg.qc.model import assess

        def qc(prediction):
            return assess(prediction, segmenter.card)
    except ImportError:  # an older lungseg, for before/after comparisons: the rules alone
        from lungseg.qc.rules import quality_flags

        def qc(prediction):
            return quality_flags(prediction.label, prediction.raw_label)

    def cpu_ms(stage) -> float:
        stage()
        t0 = time.process_time()
        for _ in range(repeats):
            stage()
        return (time.process_time() - t0) / repeats * 1e3

    image = read_radiograph(path)
    x = model_input(image.pixels, segmenter.size)
    batch = np.repeat(x[None], 4, axis=0)
    probabilities = segmenter.probabilities(x[None])[0]
    try:  # a card's quality may read the image's edges, from the network's input
        prediction = postprocess(probabilities, image.shape, model_image=x[0])
    except TypeError:  # an older lungseg
        prediction = postprocess(probabilities, image.shape)
    costs = {
        "read_and_decode": cpu_ms(lambda: read_radiograph(path)),
        "preprocess": cpu_ms(lambda: model_input(image.pixels, segmenter.size)),
        "model_forward_one_thread": cpu_ms(lambda: segmenter.probabilities(batch)) / len(batch),
        "clean_up_and_resize_back": cpu_ms(lambda: postprocess(probabilities, image.shape)),
        "qc_and_areas": cpu_ms(lambda: (qc(prediction), lung_areas(prediction.label, image.pixel_area_mm2))),
        "write_labelmap": cpu_ms(lambda: write_labelmap(prediction.label, image.reference, scratch / "stage.nrrd")),
    }
    if getattr(segmenter, "classifier", None) is not None:  # the orientation check before the model (issue 35)
        costs["orientation_check"] = cpu_ms(lambda: segmenter.orient(batch, [False] * len(batch))) / len(batch)
    try:  # the review page's thumbnail, made for every input (issue 12)
        from lungseg.batch.overlay import thumbnail_base, write_thumbnail

        costs["review_thumbnail"] = cpu_ms(
            lambda: write_thumbnail(thumbnail_base(x[0], image.shape), prediction.label, scratch / "stage.jpg")
        )
    except ImportError:
        pass
    return {k: round(v, 2) for k, v in costs.items()}


def peak_pss_of(cmd: list[str], env: dict) -> tuple[float, float]:
    """Run a command; its peak memory (MiB: the PSS of the process and every descendant, summed, so that pages
    shared between them count once) and its wall seconds. Linux (/proc)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    peak = 0.0
    while proc.poll() is None:
        peak = max(peak, sum(map(pss_mib, process_tree(proc.pid))))
        time.sleep(0.5)
    return peak, time.perf_counter() - t0


def process_tree(pid: int) -> list[int]:
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree


def pss_mib(pid: int) -> float:
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0.0
    return int(text.split("\nPss:")[1].split()[0]) / 1024


def command_env(tree: Path) -> dict:
    """The environment that runs the `lungseg` of checkout `tree`."""
    return dict(os.environ, PYTHONPATH=str(tree / "LungSegCore"), TQDM_DISABLE="1")


def median_wall(cmd: list[str], env: dict, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, env=env)
        times.append(time.perf_counter() - t0)
    return sorted(times)[repeats // 2]


def command_rate(tree: Path, listing: Path, out: Path, args: argparse.Namespace, extra: list[str]) -> float:
    """images/s that `lungseg segment` of checkout `tree`, with the options `extra`, reports for the inputs listed
    in `listing`."""
    shutil.rmtree(out, ignore_errors=True)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "lungseg",
            "segment",
            str(listing),
            "-o",
            str(out),
            "--device",
            args.device,
            "--batch-size",
            str(args.batch_size),
            *extra,
        ],
        check=True,
        capture_output=True,
        text=True,
        env=command_env(tree),
    )
    return float(re.search(r"\(([\d.]+) images/s\)", run.stdout).group(1))


# size: the alternating measurements of each checkout, one after the other as they run
def compare_versions(
    trees: dict[str, tuple[Path, list[str]]], paths: list[Path], tmp: Path, args: argparse.Namespace
) -> dict:
    """The same command-line measurements of each (checkout, extra `lungseg segment` options), alternating: cold
    start of one image (median of `--repeats`) beside the import reference, end-to-end images/s (median of
    `--repeats` runs), and with `--memory-images` the peak memory of a batch of that many."""
    listing = tmp / "inputs.txt"
    listing.write_text("\n".join(map(str, paths[: args.images])) + "\n")
    report = {name: {"checkout": str(tree), "options": extra} for name, (tree, extra) in trees.items()}
    rates = {name: [] for name in trees}
    for _ in range(args.repeats):
        for name, (tree, extra) in trees.items():
            rates[name].append(command_rate(tree, listing, tmp / f"out-{name}", args, extra))
    for name, (tree, extra) in trees.items():
        env = command_env(tree)
        cold = median_wall(
            [
                sys.executable,
                "-m",
                "lungseg",
                "segment",
                str(paths[0]),
                "-o",
                str(tmp / "cold"),
                "--device",
                args.device,
                *extra,
            ],
            env,
            args.repeats,
        )
        imports = median_wall([sys.executable, "-c", IMPORT_REFERENCE], env, args.repeats)
        report[name].update(
            end_to_end_images_per_s=sorted(rates[name])[len(rates[name]) // 2],
            end_to_end_runs=rates[name],
            cold_start_one_image_s=round(cold, 2),
            import_reference_s=round(imports, 2),
            cold_start_over_imports=round(cold / imports, 2),
        )
    if args.memory_images:
        many = make_inputs(tmp / "many", args.memory_images, args.size)
        (tmp / "many.txt").write_text("\n".join(map(str, many)) + "\n")
        for name, (tree, extra) in trees.items():
            peak, wall = peak_pss_of(
                [
                    sys.executable,
                    "-m",
                    "lungseg",
                    "segment",
                    str(tmp / "many.txt"),
                    "-o",
                    str(tmp / f"many-{name}"),
                    "--device",
                    args.device,
                    "--batch-size",
                    str(args.batch_size),
                    *extra,
                ],
                command_env(tree),
            )
            report[name]["memory"] = {
                "images": args.memory_images,
                "peak_pss_mib": round(peak, 1),
                "wall_s": round(wall, 1),
            }
    return report


def installed_size_mb(tree: Path, python: str, tmp: Path) -> float:
    """MB (10^6 bytes, files' own sizes) of a fresh venv of `python` after `pip install TREE/LungSegCore` (a
    wheel built from the checkout, as a user installs it; pip's cache lies outside the venv)."""
    venv = tmp / f"venv-{abs(hash((str(tree), python)))}"
    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
    subprocess.run(
        [
            str(bin_dir / "python"),
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            str(tree / "LungSegCore"),
        ],
        check=True,
    )
    size = sum(f.stat(follow_symlinks=False).st_size for f in venv.rglob("*") if not f.is_dir() or f.is_symlink())
    shutil.rmtree(venv)
    return round(size / 1e6, 1)


def install_sizes(trees: dict[str, tuple[Path, list[str]]], pythons: list[str], tmp: Path) -> dict:
    """The inference install's size for each checkout (options aside) and each Python asked for."""
    checkouts = dict.fromkeys(str(tree) for tree, _ in trees.values())
    return {
        checkout: {python: installed_size_mb(Path(checkout), python, tmp) for python in pythons}
        for checkout in checkouts
    }


def cpu_bound(segmenter, path: Path, tmp: Path, forward_rate: float) -> dict:
    """Each stage's CPU milliseconds per image, and from them the upper bound on the end-to-end rate."""
    costs = stage_cpu_ms(segmenter, path, tmp)
    total = sum(costs.values())
    bound = (os.cpu_count() or 1) * 1e3 / total
    return {
        "cpu_ms_per_image_by_stage": costs,
        "non_model_cpu_ms_per_image": round(total - costs["model_forward_one_thread"], 2),
        "end_to_end_upper_bound_images_per_s": round(bound, 2),
        "end_to_end_fraction_upper_bound": round(bound / forward_rate, 3),
    }


def training_rates(device: str, batch_size: int = 8, steps: int = 6) -> dict:
    import torch

    from lungseg.nets.networks import NETWORKS, build_network
    from lungseg.training.config import load_config
    from lungseg.training.losses import build_loss, training_loss

    rates = {}
    for name in sorted(NETWORKS):  # each network with its shipped config's parameters
        config_path = Path(__file__).resolve().parent.parent / "LungSegCore/lungseg/configs" / f"{name}.yaml"
        params = load_config(config_path)["network"].get("params", {}) if config_path.exists() else {}
        device = torch.device(device)
        model = build_network(name, **params).to(device).train()
        loss_fn = build_loss("dice_ce")
        opt = torch.optim.AdamW(model.parameters(), 1e-3)
        x = torch.rand(batch_size, 1, 256, 256, device=device)
        y = torch.randint(0, 3, (batch_size, 1, 256, 256), device=device)
        amp = device.type == "cuda"
        for i in range(steps + 2):
            if i == 2:
                if amp:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
            with torch.autocast(device.type, enabled=amp):
                loss, _ = training_loss(model, loss_fn, x, y)  # the training step itself: deep supervision, KL
            opt.zero_grad()
            loss.backward()
            opt.step()
        if amp:
            torch.cuda.synchronize()
        rates[name] = round(steps * batch_size / (time.perf_counter() - t0), 2)
    return rates


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--baseline",
        type=Path,
        metavar="DIR",
        action="append",
        default=[],
        help="an older checkout, measured the same way (repeat it for several)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs of each command-line measurement")
    parser.add_argument("--memory-images", type=int, default=0, help="also the peak memory of this many images")
    parser.add_argument(
        "--orientation-cost",
        action="store_true",
        help="also this checkout with --no-orientation-check, alternating: what the orientation check costs",
    )
    parser.add_argument("--training", action="store_true", help="also measure training images/s per network")
    parser.add_argument("--models", action="store_true", help="also measure the bare forward rate of every model")
    parser.add_argument(
        "--slicer",
        action="store_true",
        help="also the Slicer panel's first and second Apply (scripts/benchmark_slicer.py)",
    )
    parser.add_argument(
        "--install-size",
        metavar="PYTHON",
        action="append",
        default=[],
        help="also the venv that `pip install LungSegCore` makes with this Python, for each checkout (repeatable)",
    )
    parser.add_argument("--output", help="write the JSON report here too")
    return parser.parse_args()


def this_checkout(paths: list[Path], tmp: Path, args: argparse.Namespace) -> dict:
    """In this process: end to end, the bare forward rate around it, and on a CPU each stage's cost and bound."""
    from lungseg.batch.run import segment_inputs
    from lungseg.inference.segmenter import Segmenter
    from lungseg.memory import keep_freed_memory

    keep_freed_memory()  # as `lungseg segment` does, so that in-process numbers match the command's
    segmenter = Segmenter("unet", args.device)
    before = bare_forward_rate(segmenter, args.batch_size)
    summary = segment_inputs(
        [str(p) for p in paths[: args.images]], tmp / "out", device=args.device, batch_size=args.batch_size
    )
    after = bare_forward_rate(segmenter, args.batch_size)  # before and after: a shared machine drifts
    forward = (before + after) / 2
    report = {
        "model_forward_images_per_s": round(forward, 2),
        "model_forward_before_and_after": [round(before, 2), round(after, 2)],
        "end_to_end_images_per_s": round(summary.images_per_second, 2),
        "end_to_end_fraction_of_forward": round(summary.images_per_second / forward, 3),
    }
    if args.device == "cpu":
        report.update(cpu_bound(Segmenter("unet", "cpu", threads=1), paths[0], tmp, forward))
    if args.models:
        from lungseg.models.cards import list_models

        report["model_forward_images_per_s_by_model"] = {
            card["name"]: round(bare_forward_rate(Segmenter(card["name"], args.device), args.batch_size, 5.0), 2)
            for card in list_models()
        }
    return report


def main() -> None:
    args = parse_args()
    import onnxruntime

    report = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, onnxruntime {onnxruntime.__version__}",
        "device": args.device,
        "image_size": args.size,
        "batch_size": args.batch_size,
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = make_inputs(tmp / "in", args.images, args.size)
        report["this_checkout"] = this_checkout(paths, tmp, args)
        trees = {"this": (REPO, [])}
        if args.orientation_cost:
            trees["this_without_orientation_check"] = (REPO, ["--no-orientation-check"])
        for number, baseline in enumerate(args.baseline, 1):
            trees["baseline" if number == 1 else f"baseline{number}"] = (baseline.resolve(), [])
        report["command_line"] = compare_versions(trees, paths, tmp, args)
        if args.install_size:
            report["install_size_mb"] = install_sizes(trees, args.install_size, tmp)
    if args.training:
        report["training_images_per_s"] = training_rates(args.device)
    if args.slicer:  # in a fresh process: its first Apply must import onnxruntime and open the session itself
        script = Path(__file__).with_name("benchmark_slicer.py")
        run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True)
        report["slicer_panel"] = json.loads(run.stdout)
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")


if __name__ == "__main__":
    main()
