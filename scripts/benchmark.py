#!/usr/bin/env python
"""Speed and memory of LungSeg, measured (never asserted in tests).

    .venv/bin/python scripts/benchmark.py                       # segmentation benchmark, 1024² PNGs
    .venv/bin/python scripts/benchmark.py --memory-images 10000 # also: peak RSS over a 10,000-image run
    .venv/bin/python scripts/benchmark.py --training            # also: training images/s per network
    .venv/bin/python scripts/benchmark.py --models              # also: forward images/s of every shipped model

Inputs are made from the bundled demo radiographs, resized to 1024² 8-bit PNGs, in a temporary folder.
It reports images/s end to end (model loaded, startup excluded), the bare model-forward rate at the same batch size
(measured before and after the run, and averaged) and their ratio,
a naive one-file-at-a-time MONAI pipeline for comparison, the cold start for one image, and on CUDA, AMP.

It also reports the CPU milliseconds per image of every stage, each measured alone on one thread, and from them an
upper bound on the end-to-end rate of any pipeline on this machine's cores: all of that work, perfectly overlapped,
with no interprocess copies and no contention. On a CPU, where decoding and the model share the cores, that bound
divided by the bare forward rate is the highest end-to-end fraction this machine allows.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

# Timings that the package's docstrings used to quote, measured on a 2-core x86-64 machine (CPU, one thread unless
# said). They explain choices in the code; rerun this script to see where a machine stands today.
# - postprocess._resize_uint8: the bilinear resize of the probabilities as uint8 channels-last is about 20x faster
#   than in float32.
# - postprocess._winning_class at 1024²: a contiguous copy and two NumPy comparisons 1.1 ms; torch comparisons of
#   the strided slices 1.8 ms; torch.argmax 8 ms.
# - labels.clean_labelmap: SciPy's labelling called directly is 2.5x faster at 256² than MONAI's
#   KeepLargestConnectedComponent followed by binary_fill_holes.
# - transforms.percentiles: one NumPy partition is 3x faster than sorting, or than kthvalue per statistic.
# - workers.helper_process: giving the model only the cores that the helpers left over held a 2-core machine at
#   the one-thread forward rate (32 images/s, against 57 with the helpers at a lower priority).
# - memory.keep_freed_memory: U-Net forward on 2 cores 54-66 images/s with glibc's defaults, 72-80 with freed
#   memory kept in the heap.

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
import torch  # noqa: E402


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
    x = torch.rand(batch_size, 1, segmenter.size, segmenter.size)
    segmenter.probabilities(x)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        segmenter.probabilities(x)
        n += batch_size
    return n / (time.perf_counter() - t0)


def stage_cpu_ms(segmenter, path: Path, scratch: Path, repeats: int = 30) -> dict:
    """CPU milliseconds per image of each stage of `lungseg segment`, one thread, each stage alone."""
    from lungseg.io.radiograph import read_radiograph, write_labelmap
    from lungseg.inference.labels import lung_areas
    from lungseg.inference.postprocess import postprocess
    from lungseg.inference.preprocess import model_input
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

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        image = read_radiograph(path)
        x = model_input(image.pixels, segmenter.size)
        batch = x[None].repeat(4, 1, 1, 1)
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
            "write_labelmap": cpu_ms(lambda: write_labelmap(prediction.label, image.reference,
                                                            scratch / "stage.nrrd")),
        }
        try:  # the review page's thumbnail, made for every input (issue 12)
            from lungseg.batch.overlay import thumbnail_base, write_thumbnail

            costs["review_thumbnail"] = cpu_ms(lambda: write_thumbnail(
                thumbnail_base(x[0].numpy(), image.shape), prediction.label, scratch / "stage.jpg"))
        except ImportError:
            pass
    finally:
        torch.set_num_threads(threads)
    return {k: round(v, 2) for k, v in costs.items()}


def naive_monai_rate(paths: list[Path], out: Path, card: dict, model) -> float:
    """What a user would write: LoadImage -> resize -> model -> resize back -> SaveImage, one file at a time."""
    from monai.transforms import (Compose, EnsureChannelFirst, LoadImage, Resize, SaveImage,
                                  ScaleIntensityRangePercentiles)

    size = card["input_size"]
    load = Compose([LoadImage(image_only=True), EnsureChannelFirst(),
                    ScaleIntensityRangePercentiles(0.5, 99.5, 0.0, 1.0, clip=True)])
    save = SaveImage(output_dir=str(out), output_ext=".nii.gz", output_dtype=np.uint8, separate_folder=False,
                     print_log=False)
    t0 = time.perf_counter()
    with torch.no_grad():
        for path in paths:
            image = load(str(path))
            x = Resize((size, size), mode="bilinear")(image)[None]
            probs = torch.softmax(model(x.float()), 1)[0]
            back = Resize(image.shape[1:], mode="bilinear")(probs)
            label = back.argmax(0, keepdim=True).to(torch.uint8)
            label.meta = image.meta
            save(label)
    return len(paths) / (time.perf_counter() - t0)


def peak_rss_of(cmd: list[str]) -> tuple[float, list[float], float]:
    """Run a command; return its peak RSS (MiB), RSS samples every 5 s, and wall seconds."""
    samples, t0 = [], time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def sample():
        while proc.poll() is None:
            try:
                text = Path(f"/proc/{proc.pid}/status").read_text()
                samples.append(int(text.split("VmRSS:")[1].split()[0]) / 1024)
            except (OSError, IndexError):
                pass
            time.sleep(5)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    proc.wait()
    thread.join()
    import resource

    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return peak, samples, time.perf_counter() - t0


def training_rates(device: torch.device, batch_size: int = 8, steps: int = 6) -> dict:
    from lungseg.training.losses import build_loss
    from lungseg.nets.networks import NETWORKS, build_network
    from lungseg.training.trainer import load_config, training_loss

    rates = {}
    for name in sorted(NETWORKS):  # each network with its shipped config's parameters
        config_path = Path(__file__).resolve().parent.parent / "LungSegCore/lungseg/configs" / f"{name}.yaml"
        params = load_config(config_path)["network"].get("params", {}) if config_path.exists() else {}
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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--naive-images", type=int, default=60)
    parser.add_argument("--memory-images", type=int, default=0, help="also run this many images for peak RSS")
    parser.add_argument("--training", action="store_true", help="also measure training images/s per network")
    parser.add_argument("--models", action="store_true", help="also measure the bare forward rate of every model")
    parser.add_argument("--slicer", action="store_true",
                        help="also measure the Slicer panel's responsiveness (scripts/benchmark_slicer.py)")
    parser.add_argument("--output", help="write the JSON report here too")
    return parser.parse_args()


def cpu_bound(segmenter, path: Path, tmp: Path, forward_rate: float) -> dict:
    """Each stage's CPU milliseconds per image, and from them the upper bound on the end-to-end rate."""
    costs = stage_cpu_ms(segmenter, path, tmp)
    total = sum(costs.values())
    bound = (os.cpu_count() or 1) * 1e3 / total
    return {"cpu_ms_per_image_by_stage": costs,
            "non_model_cpu_ms_per_image": round(total - costs["model_forward_one_thread"], 2),
            "end_to_end_upper_bound_images_per_s": round(bound, 2),
            "end_to_end_fraction_upper_bound": round(bound / forward_rate, 3)}


def memory_report(tmp: Path, args: argparse.Namespace) -> dict:
    """Peak RSS of `lungseg segment` over `--memory-images` inputs, in a process of its own."""
    many = make_inputs(tmp / "many", args.memory_images, args.size)
    listing = tmp / "many.txt"
    listing.write_text("\n".join(str(p) for p in many) + "\n")
    peak, samples, wall = peak_rss_of([sys.executable, "-m", "lungseg", "segment", str(listing), "-o",
                                       str(tmp / "many-out"), "--device", args.device,
                                       "--batch-size", str(args.batch_size)])
    return {"images": args.memory_images, "peak_rss_mib": round(peak, 1),
            "rss_first_minute_mib": round(max(samples[:12]), 1) if samples else None,
            "rss_last_minute_mib": round(max(samples[-12:]), 1) if samples else None,
            "wall_s": round(wall, 1)}


def naive_comparison(segmenter, paths: list[Path], out: Path, device: str, end_to_end: float) -> dict:
    """The naive one-file-at-a-time MONAI pipeline's rate, and the batch's speedup over it."""
    model = segmenter.model.cpu() if device == "cpu" else segmenter.model
    naive = round(naive_monai_rate(paths, out, segmenter.card, model), 2)
    return {"naive_monai_images_per_s": naive, "speedup_vs_naive": round(end_to_end / naive, 2)}


def main() -> None:
    args = parse_args()

    from lungseg.inference.segmenter import Segmenter
    from lungseg.memory import keep_freed_memory
    from lungseg.batch.run import segment_inputs

    keep_freed_memory()  # as `lungseg segment` does, so that in-process numbers match the command's

    report = {"machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
              "device": args.device, "image_size": args.size, "batch_size": args.batch_size}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = make_inputs(tmp / "in", max(args.images, args.naive_images), args.size)
        segmenter = Segmenter("unet", args.device)
        before = bare_forward_rate(segmenter, args.batch_size)
        summary = segment_inputs([str(p) for p in paths[:args.images]], tmp / "out", device=args.device,
                                 batch_size=args.batch_size)
        after = bare_forward_rate(segmenter, args.batch_size)  # before and after: a shared machine drifts
        report["model_forward_images_per_s"] = round((before + after) / 2, 2)
        report["model_forward_before_and_after"] = [round(before, 2), round(after, 2)]
        report["end_to_end_images_per_s"] = round(summary.images_per_second, 2)
        report["end_to_end_fraction_of_forward"] = round(
            report["end_to_end_images_per_s"] / report["model_forward_images_per_s"], 3)

        if args.device == "cpu":
            report.update(cpu_bound(segmenter, paths[0], tmp, report["model_forward_images_per_s"]))

        if args.naive_images:  # 0 skips the naive pipeline (short runs on a busy machine)
            report.update(naive_comparison(segmenter, paths[:args.naive_images], tmp / "naive", args.device,
                                           report["end_to_end_images_per_s"]))

        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "lungseg", "segment", str(paths[0]), "-o", str(tmp / "cold"),
                        "--device", args.device], check=True, capture_output=True)
        report["cold_start_one_image_s"] = round(time.perf_counter() - t0, 2)

        if args.memory_images:
            report["memory"] = memory_report(tmp, args)
    if args.models:
        from lungseg.models.cards import list_models

        report["model_forward_images_per_s_by_model"] = {
            card["name"]: round(bare_forward_rate(Segmenter(card["name"], args.device), args.batch_size, 5.0), 2)
            for card in list_models()}
    if args.training:
        report["training_images_per_s"] = training_rates(torch.device(args.device))
    if args.slicer:  # in a fresh process: its first Apply must import onnxruntime and open the session itself
        script = Path(__file__).with_name("benchmark_slicer.py")
        run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True)
        report["slicer_panel"] = json.loads(run.stdout)
    if torch.cuda.is_available() and args.device.startswith("cuda"):
        report["gpu"] = torch.cuda.get_device_name(0)
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")


if __name__ == "__main__":
    main()
