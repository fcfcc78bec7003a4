"""ONNX graphs of trained networks, for the torch-free inference path (`inference/runtime.py`).

A network exports as one graph: input `image` (B, 1, S, S) float32, output `logits` (B, 3, S, S), the batch axis
dynamic. An ensemble exports one graph per member; the runtime resizes and averages them, as nnU-Net ensembles its
folds. The probabilistic U-Net's graph takes a second input `noise` (N, B, L) of standard-normal draws and returns
the logits of each, (N, B, 3, S, S), for z = prior mean + prior sigma * noise: zeros give the prior mean (the
default prediction), and N draws the latent samples of `--uncertainty`.

A graph holds no weights of its own: each of its initialisers is the network's parameter or buffer as stored in the
model's safetensors file beside it, which the graph names as ONNX external data (file, offset, length). The model
ships its weights once (for training and for inference), as nnU-Net and TotalSegmentator ship one file per
checkpoint. The graph is exported without constant folding, so that every initialiser is a stored tensor; ONNX
Runtime folds the batch norms into the convolutions when it loads the graph.
"""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..io.files import atomic_path
from ..models.cards import sha256_of
from ..nets.networks import Ensemble, predict_logits

# onnxruntime 1.19.2, the newest for Python 3.9 (Slicer 5.6 and 5.8), runs opsets up to 21
OPSET = 17
TOLERANCE = 1e-3  # the largest logit difference from torch's forward pass that an export may have


class LogitsGraph(nn.Module):
    """What a segmentation network's graph computes: its deterministic logits (UNet++'s full-depth head)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return predict_logits(self.net, image)


class PriorSamplesGraph(nn.Module):
    """The probabilistic U-Net's logits for given draws of its prior: the U-Net runs once per image."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        features = self.net.unet(image)
        mean, sigma = self.net.prior.gaussian(image)
        z = (mean[None] + sigma[None] * noise).flatten(0, 1)  # (N * B, L), draw-major
        tiled = features[None].expand(noise.shape[0], -1, -1, -1, -1).flatten(0, 1)
        logits = self.net.combine(tiled, z)
        return logits.unflatten(0, (noise.shape[0], -1))


def graph_of(net: nn.Module) -> nn.Module:
    return PriorSamplesGraph(net) if hasattr(net, "prior") else LogitsGraph(net)


def example_inputs(graph: nn.Module, size: int, batch: int = 2, draws: int = 3) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    inputs = {"image": torch.rand(batch, 1, size, size, generator=generator)}
    if isinstance(graph, PriorSamplesGraph):
        inputs["noise"] = torch.randn(draws, batch, graph.net.prior.latent_dim, generator=generator)
    return inputs


def safetensors_offsets(path: Path) -> dict[str, tuple[int, int]]:
    """Each tensor's (offset, length) in bytes from the start of a safetensors file: an 8-byte little-endian header
    length, the JSON header, then the tensors' bytes at the header's `data_offsets`."""
    with open(path, "rb") as f:
        (header_length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_length))
    start = 8 + header_length
    return {
        name: (start + entry["data_offsets"][0], entry["data_offsets"][1] - entry["data_offsets"][0])
        for name, entry in header.items()
        if name != "__metadata__"
    }


def refer_to_weights(graph, weights: Path, prefix: str) -> None:
    """Point each initialiser of `graph` (an onnx ModelProto) whose bytes are those of the tensor `prefix + name` in
    the safetensors file `weights` at that tensor, as external data; any other initialiser stays in the graph."""
    from onnx import TensorProto
    from onnx.external_data_helper import set_external_data

    offsets = safetensors_offsets(weights)
    data = weights.read_bytes()
    for tensor in graph.graph.initializer:
        key = prefix + tensor.name.removeprefix("net.")
        if key not in offsets:
            continue
        offset, length = offsets[key]
        if tensor.raw_data != data[offset : offset + length]:
            continue
        set_external_data(tensor, weights.name, offset=offset, length=length)
        tensor.ClearField("raw_data")
        tensor.data_location = TensorProto.EXTERNAL


def write_graph(net: nn.Module, size: int, path: Path, weights: Path, prefix: str = "") -> None:
    """Export `net` (eval mode, on the CPU) to the ONNX file `path`, atomically, its weights read from the
    safetensors file `weights` in the same folder (the tensors named `prefix` + the network's own names)."""
    import onnx

    graph = graph_of(net.to("cpu").eval()).eval()
    inputs = example_inputs(graph, size)
    axes = {"image": {0: "batch"}, "logits": {0: "batch"}}
    if "noise" in inputs:
        axes = {"image": {0: "batch"}, "noise": {0: "draws", 1: "batch"}, "logits": {0: "draws", 1: "batch"}}
    exported = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(
            graph,
            tuple(inputs.values()),
            exported,
            input_names=list(inputs),
            output_names=["logits"],
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
            do_constant_folding=False,  # every initialiser stays a stored parameter or buffer
        )
    model = onnx.load_from_string(exported.getvalue())
    refer_to_weights(model, Path(weights), prefix)
    with atomic_path(path) as tmp:
        tmp.write_bytes(model.SerializeToString())


def graph_difference(net: nn.Module, size: int, path: Path) -> float:
    """The largest absolute logit difference between the graph at `path` (ONNX Runtime) and `net` (torch), on a
    batch of random images (and latent draws) other than the export's."""
    from ..inference.runtime import open_session, run

    graph = graph_of(net.to("cpu").eval()).eval()
    inputs = example_inputs(graph, size, batch=3, draws=2)
    inputs["image"] = inputs["image"].flip(0)  # not the traced example
    with torch.no_grad():
        expected = graph(*inputs.values()).numpy()
    actual = run(open_session(path, "cpu", threads=1), **{k: v.numpy() for k, v in inputs.items()})
    return float(np.abs(actual - expected).max())


def export_graphs(model: nn.Module, card: dict, out_dir: Path) -> dict:
    """Write the card's ONNX graphs beside its safetensors weights (written first), which they read; each is checked
    against torch. Returns the card's `onnx` entry."""
    from ..errors import LungSegError

    weights = Path(out_dir) / f"{card['name']}.safetensors"

    if isinstance(model, Ensemble):
        members = [
            (net, int(spec["input_size"])) for net, spec in zip(model.members, card["network"]["params"]["members"])
        ]
    else:
        members = [(model, int(card["input_size"]))]
    graphs = []
    for k, (net, size) in enumerate(members):
        file = f"{card['name']}.onnx" if len(members) == 1 else f"{card['name']}.member{k + 1}.onnx"
        write_graph(net, size, Path(out_dir) / file, weights, prefix="" if len(members) == 1 else f"members.{k}.")
        difference = graph_difference(net, size, Path(out_dir) / file)
        if difference > TOLERANCE:
            raise LungSegError(
                f"{file}: the ONNX graph's logits differ from torch's by {difference:.2g} "
                f"(more than {TOLERANCE}); not exported"
            )
        graphs.append(
            {
                "file": file,
                "input_size": size,
                "sha256": sha256_of(Path(out_dir) / file),
                "max_logit_difference": float(f"{difference:.2g}"),
            }
        )
    return {"opset": OPSET, "weights": weights.name, "graphs": graphs}
