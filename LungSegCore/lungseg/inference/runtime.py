"""ONNX Runtime sessions for the shipped graphs: the forward pass without torch.

Tuned for this workload (small graphs, many images): each session keeps its CPU memory arena (ONNX Runtime's default).
With the arena off, the segmentation network's and the orientation classifier's activations, freed and allocated
in turn on glibc's heap (kept there by `memory.keep_freed_memory`), fragmented it: the batch's main process peaked
at 478 MiB against 267 without the classifier; with each session's arena, at 225 MiB (217 without), over 1,000
1024² PNGs. Every graph optimisation is on, one intra-op pool takes the threads asked for, and its threads do not
spin while they wait.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import LungSegError

THREADS_VARIABLE = "OMP_NUM_THREADS"  # honoured as torch honoured it: tests and helpers ask for one thread


def default_threads() -> int:
    """The threads a session uses: OMP_NUM_THREADS when set, else 0 (ONNX Runtime's default: every core)."""
    try:
        return max(0, int(os.environ.get(THREADS_VARIABLE, "0")))
    except ValueError:
        return 0


def providers(device: str = "auto") -> list:
    """ONNX Runtime execution providers for `--device`: cpu, cuda or cuda:N (onnxruntime-gpu), or auto."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "auto":
        return (["CUDAExecutionProvider"] if "CUDAExecutionProvider" in available else []) + ["CPUExecutionProvider"]
    kind, _, index = device.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise LungSegError(f"unknown device '{device}'; use auto, cpu, cuda or cuda:N")
    if "CUDAExecutionProvider" not in available:
        raise LungSegError(
            f"--device {device} needs ONNX Runtime's CUDA provider, which this installation lacks: "
            "pip install 'lungseg[cuda]' (onnxruntime-gpu) on a machine with CUDA, or use --device cpu"
        )
    return [("CUDAExecutionProvider", {"device_id": int(index or 0)}), "CPUExecutionProvider"]


def device_name(session) -> str:
    """What a session runs on, for results.csv: cpu, or cuda:N."""
    for name, options in zip(session.get_providers(), session.get_provider_options().values()):
        if name == "CUDAExecutionProvider":
            return f"cuda:{options.get('device_id', 0)}"
    return "cpu"


def open_session(path: str | Path, device: str = "auto", threads: int | None = None):
    """An inference session for the graph at `path`."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = default_threads() if threads is None else threads
    options.inter_op_num_threads = 1
    # no busy-waiting between operators: the reader and finisher processes need those cycles (+6 % end to end on
    # 2 cores, scripts/benchmark.py)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: warnings about unused initialisers are not the user's business
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers(device))
    except LungSegError:
        raise
    except Exception as exc:  # onnxruntime's own errors (a damaged graph, an unsupported operator)
        raise LungSegError(f"{path}: ONNX Runtime cannot load this graph ({exc})") from exc


def run(session, **inputs: np.ndarray) -> np.ndarray:
    """The graph's first output for named float32 inputs."""
    feed = {name: np.ascontiguousarray(value, dtype=np.float32) for name, value in inputs.items()}
    return session.run(None, feed)[0]
