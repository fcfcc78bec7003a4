"""One registry: a network name maps to a builder that takes the config's parameters."""

from __future__ import annotations

import platform

import torch

from ..definitions import NUM_CLASSES
from ..errors import LungSegError
from ..registry import Registry

NETWORKS = Registry("network")
register = NETWORKS.register
build_network = NETWORKS.build


def select_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:  # torch's message lists every device type it knows
        raise LungSegError(f"unknown device '{name}'; use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LungSegError(f"device '{name}' requested but CUDA is not available")
    return device


def environment_entry(device: torch.device) -> dict:
    """Where and with what a run trains, for its model card: the GPU's name (or the CPU's architecture and thread
    count) and the versions of torch and MONAI."""
    import monai

    hardware = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.machine()} CPU x{torch.get_num_threads()}"
    )
    return {"hardware": hardware, "torch": torch.__version__.split("+")[0], "monai": monai.__version__}


def predict_logits(model, x: torch.Tensor) -> torch.Tensor:
    """Deterministic logits for inference and validation.

    Networks that return a list (UNet++ with deep supervision) give the full-depth output last.
    """
    out = model(x)
    return out[-1] if isinstance(out, (list, tuple)) else out


@register("unet")
def unet(
    in_channels: int = 1,
    out_channels: int = NUM_CLASSES,
    channels=(16, 32, 64, 128, 256),
    strides=None,
    num_res_units: int = 2,
    dropout: float = 0.0,
    norm: str = "batch",
) -> torch.nn.Module:
    """MONAI U-Net; depth follows the length of `channels`."""
    from monai.networks.nets import UNet

    channels = tuple(channels)
    strides = tuple(strides) if strides is not None else (2,) * (len(channels) - 1)
    return UNet(
        spatial_dims=2,
        in_channels=in_channels,
        out_channels=out_channels,
        channels=channels,
        strides=strides,
        num_res_units=num_res_units,
        dropout=dropout,
        norm=norm,
    )


@register("unetpp")
def unetpp(
    in_channels: int = 1,
    out_channels: int = NUM_CLASSES,
    features=(16, 16, 32, 64, 128, 16),
    deep_supervision: bool = True,
    dropout: float = 0.0,
) -> torch.nn.Module:
    """MONAI BasicUNetPlusPlus (nested U-Net); width set by `features` (MONAI's default is 2x this, 4x slower)."""
    from monai.networks.nets import BasicUNetPlusPlus

    return BasicUNetPlusPlus(
        spatial_dims=2,
        in_channels=in_channels,
        out_channels=out_channels,
        features=tuple(features),
        deep_supervision=deep_supervision,
        dropout=dropout,
    )


@register("prob_unet")
def prob_unet(**params) -> torch.nn.Module:
    """Probabilistic U-Net (Kohl et al. 2018), built from MONAI blocks in `prob_unet.py`."""
    from .prob_unet import ProbabilisticUNet

    return ProbabilisticUNet(**params)


class Ensemble(torch.nn.Module):
    """Trained networks whose softmax probabilities are averaged, as nnU-Net ensembles its folds. Each member sees
    the input resized to the size it was trained at. The output is the log of the mean probabilities at the input's
    size, so a softmax over it gives back that mean."""

    def __init__(self, members: list[dict]):
        super().__init__()
        if not members:
            raise LungSegError("an ensemble needs at least one member network")
        self.members = torch.nn.ModuleList(build_network(m["name"], **m.get("params", {})) for m in members)
        self.sizes = [int(m["input_size"]) for m in members]

    def member_probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) -> (M, B, 3, H, W): each member's softmax at the input's size."""
        import torch.nn.functional as F

        size = tuple(x.shape[-2:])
        out = []
        for net, s in zip(self.members, self.sizes):
            xs = (
                x
                if size == (s, s)
                else F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=s < size[0])
            )
            probs = torch.softmax(predict_logits(net, xs).float(), dim=1)
            if probs.shape[-2:] != size:
                probs = F.interpolate(probs, size=size, mode="bilinear", align_corners=False)
            out.append(probs)
        return torch.stack(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(self.member_probabilities(x).mean(0).clamp_min(1e-12))


@register("ensemble")
def ensemble(members: list[dict]) -> torch.nn.Module:
    """`members`: the `{name, params, input_size}` of each network; `lungseg export RUN RUN ...` writes them."""
    return Ensemble(members)
