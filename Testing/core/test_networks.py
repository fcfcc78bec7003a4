"""The network registry and the parts of the probabilistic U-Net."""

from __future__ import annotations

import pytest
import torch

from lungseg.errors import LungSegError
from lungseg.nets.networks import NETWORKS, build_network, predict_logits
from lungseg.training.losses import build_loss, training_loss

SMALL = {
    "unet": {"channels": [8, 16, 32]},
    "unetpp": {"features": [8, 8, 16, 32, 64, 8]},
    "prob_unet": {"channels": [8, 16, 32], "encoder_channels": [8, 16], "feature_channels": 8},
}
# an ensemble of two of them, one trained at another size (UNet++'s deep supervision: its full-depth output is used)
SMALL["ensemble"] = {
    "members": [
        dict(name="unet", params=SMALL["unet"], input_size=64),
        dict(name="unetpp", params=SMALL["unetpp"], input_size=32),
    ]
}


def test_registry_builds_every_network_from_parameters():
    assert set(NETWORKS) == {"unet", "unetpp", "prob_unet", "ensemble"}
    x = torch.rand(2, 1, 64, 64)
    for name, params in SMALL.items():
        model = build_network(name, **params).eval()
        assert predict_logits(model, x).shape == (2, 3, 64, 64), name
    with pytest.raises(LungSegError, match="unknown network 'vnet'"):
        build_network("vnet")


def test_unetpp_deep_supervision_gives_the_full_depth_output_last():
    """UNet++'s deep-supervision head j reads the encoder down to level j only (x_0_j). Perturbing encoder level
    k moves exactly the heads j >= k, so the head that the deepest level alone moves is the full-depth one, and
    it is the one inference uses."""
    torch.manual_seed(0)
    model = build_network("unetpp", **SMALL["unetpp"]).eval()
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        heads = model(x)
        logits = predict_logits(model, x)
        assert len(heads) == 4 and all(h.shape == (1, 3, 64, 64) for h in heads)
        for level in range(1, 5):
            hook = getattr(model, f"conv_{level}_0").register_forward_hook(lambda module, args, out: out + 1.0)
            moved_heads = [not torch.allclose(a, b) for a, b in zip(heads, model(x))]
            moved_logits = not torch.allclose(logits, predict_logits(model, x))
            hook.remove()
            assert moved_heads == [head >= level for head in range(1, 5)], (level, moved_heads)
            assert moved_logits, f"inference ignores encoder level {level}: not the full-depth output"
        assert moved_heads.index(True) == len(heads) - 1, "the full-depth head comes last"


@pytest.fixture
def prob_unet():
    torch.manual_seed(0)
    return build_network("prob_unet", **SMALL["prob_unet"])


def test_prob_unet_kl_is_non_negative_and_enters_the_loss(prob_unet):
    x, y = torch.rand(2, 1, 64, 64), torch.randint(0, 3, (2, 1, 64, 64))
    with torch.no_grad():  # move prior and posterior apart so the KL is not trivially zero
        prob_unet.posterior.head.bias.normal_(0, 0.5)
    prob_unet.train()
    loss_fn = build_loss("dice_ce")
    loss, _ = training_loss(prob_unet, loss_fn, x, y)
    assert prob_unet.kl.item() > 0
    assert loss.item() == pytest.approx((loss_fn(prob_unet(x, y), y) + prob_unet.beta * prob_unet.kl).item(), rel=0.2)
    loss.backward()
    assert prob_unet.posterior.head.weight.grad.abs().sum() > 0
    assert prob_unet.prior.head.weight.grad.abs().sum() > 0, "the KL term trains the prior"


def test_prob_unet_posterior_is_used_only_in_training(prob_unet):
    calls = []
    prob_unet.posterior.register_forward_hook(lambda *args: calls.append(1))
    prob_unet.eval()
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        first, second = prob_unet(x), prob_unet(x)
        samples = prob_unet.sample(x, 4)
    assert torch.equal(first, second), "without labels the prior mean gives a deterministic output"
    assert calls == []
    assert samples.shape == (4, 1, 3, 64, 64)
    assert (samples[0] - samples[1]).abs().max() > 1e-4, "prior samples must differ"
    prob_unet.train()
    prob_unet(x, torch.randint(0, 3, (1, 1, 64, 64)))
    assert calls == [1]
