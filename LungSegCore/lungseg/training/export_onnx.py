"""ONNX graphs of trained networks, for the torch-free inference path (`inference/runtime.py`).

A network exports as one graph: input `image` (B, 1, S, S) float32, output `logits` (B, 3, S, S), the batch axis
dynamic. An ensemble exports one graph per member; the runtime resizes and averages them, as nnU-Net ensembles its
folds. The probabilistic U-Net's graph takes a second input `noise` (N, B, L) of standard-normal draws and returns
the logits of each, (N, B, 3, S, S), for z = prior mean + prior sigma * noise: zeros give the prior mean (the
default prediction), and N draws the latent samples of `--uncertainty`.
"""

from __future__ import annotations

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


def write_graph(net: nn.Module, size: int, path: Path) -> None:
    """Export `net` (eval mode, on the CPU) to the ONNX file `path`, atomically."""
    graph = graph_of(net.to("cpu").eval()).eval()
    inputs = example_inputs(graph, size)
    axes = {"image": {0: "batch"}, "logits": {0: "batch"}}
    if "noise" in inputs:
        axes = {"image": {0: "batch"}, "noise": {0: "draws", 1: "batch"}, "logits": {0: "draws", 1: "batch"}}
    with atomic_path(path) as tmp, torch.no_grad():
        torch.onnx.export(
            graph,
            tuple(inputs.values()),
            str(tmp),
            input_names=list(inputs),
            output_names=["logits"],
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
        )


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
    """Write the card's ONNX graphs beside its weights, each checked against torch; the card's `onnx` entry."""
    from ..errors import LungSegError

    if isinstance(model, Ensemble):
        members = [
            (net, int(spec["input_size"])) for net, spec in zip(model.members, card["network"]["params"]["members"])
        ]
    else:
        members = [(model, int(card["input_size"]))]
    graphs = []
    for k, (net, size) in enumerate(members):
        file = f"{card['name']}.onnx" if len(members) == 1 else f"{card['name']}.member{k + 1}.onnx"
        write_graph(net, size, Path(out_dir) / file)
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
    return {"opset": OPSET, "graphs": graphs}
