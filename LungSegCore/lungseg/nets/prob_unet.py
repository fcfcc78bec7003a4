"""Probabilistic U-Net (Kohl et al., NeurIPS 2018) from MONAI blocks.

A U-Net gives features; a prior net (image) and a posterior net (image + truth) give Gaussians over a small
latent space. A latent sample is tiled over the image and joined to the U-Net features by 1x1 convolutions.
Training draws from the posterior and adds beta * KL(posterior || prior); inference draws from the prior only,
so N samples give a mean segmentation and a per-pixel uncertainty (their spread).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributions import Independent, Normal, kl_divergence

from ..definitions import NUM_CLASSES


class AxisAlignedGaussianEncoder(nn.Module):
    """Strided MONAI residual units, global average pooling, then a 1x1 conv to (mean, log sigma).

    Every unit strides by 2, the first included: the latent is global, so full-resolution detail adds cost
    (the encoders would otherwise cost as much as the U-Net on CPU) and no information the pooling keeps.
    """

    def __init__(self, in_channels: int, channels, latent_dim: int):
        super().__init__()
        from monai.networks.blocks import ResidualUnit

        layers, previous = [], in_channels
        for width in channels:
            layers.append(ResidualUnit(2, previous, width, strides=2, subunits=2, norm="batch"))
            previous = width
        self.encoder = nn.Sequential(*layers)
        self.head = nn.Conv2d(previous, 2 * latent_dim, kernel_size=1)
        nn.init.zeros_(self.head.weight)  # start at N(0, 1): KL and latent influence grow from zero
        nn.init.zeros_(self.head.bias)
        self.latent_dim = latent_dim

    def gaussian(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, latent) mean and sigma: the distribution's parameters, as the ONNX graph computes them."""
        pooled = self.encoder(x).mean(dim=(2, 3), keepdim=True)
        mean, log_sigma = self.head(pooled)[:, :, 0, 0].chunk(2, dim=1)
        return mean, torch.exp(log_sigma.clamp(-8, 8))

    def forward(self, x: torch.Tensor) -> Independent:
        return Independent(Normal(*self.gaussian(x)), 1)


class ProbabilisticUNet(nn.Module):
    uses_labels_in_training = True

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = NUM_CLASSES,
        channels=(16, 32, 64, 128, 256),
        num_res_units: int = 2,
        feature_channels: int = 8,
        latent_dim: int = 6,
        encoder_channels=(16, 32, 64, 128),
        beta: float = 1.0,
        fcomb_layers: int = 2,
    ):
        super().__init__()
        from monai.networks.nets import UNet

        self.out_channels, self.beta = out_channels, beta
        self.unet = UNet(
            spatial_dims=2,
            in_channels=in_channels,
            out_channels=feature_channels,
            channels=tuple(channels),
            strides=(2,) * (len(channels) - 1),
            num_res_units=num_res_units,
        )
        self.prior = AxisAlignedGaussianEncoder(in_channels, encoder_channels, latent_dim)
        self.posterior = AxisAlignedGaussianEncoder(in_channels + out_channels, encoder_channels, latent_dim)
        layers, width = [], feature_channels + latent_dim
        for _ in range(fcomb_layers - 1):
            layers += [nn.Conv2d(width, feature_channels, 1), nn.ReLU(inplace=True)]
            width = feature_channels
        layers.append(nn.Conv2d(width, out_channels, 1))
        self.fcomb = nn.Sequential(*layers)
        self.kl = torch.zeros(())

    def combine(self, features: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        tiled = z[:, :, None, None].expand(-1, -1, *features.shape[2:])
        return self.fcomb(torch.cat([features, tiled], dim=1))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """With labels (training): a posterior sample, and `self.kl` set. Without: the prior mean."""
        features = self.unet(x)
        prior = self.prior(x)
        if y is None:
            return self.combine(features, prior.mean)
        onehot = torch.nn.functional.one_hot(y[:, 0].long(), self.out_channels).permute(0, 3, 1, 2).to(x.dtype)
        posterior = self.posterior(torch.cat([x, onehot], dim=1))
        self.kl = kl_divergence(posterior, prior).mean()
        return self.combine(features, posterior.rsample())

    def auxiliary_loss(self) -> torch.Tensor:
        return self.beta * self.kl

    @torch.no_grad()
    def sample(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """(n, B, C, H, W) logits from n draws of the prior; the U-Net runs once."""
        features = self.unet(x)
        prior = self.prior(x)
        return torch.stack([self.combine(features, prior.sample()) for _ in range(n)])
