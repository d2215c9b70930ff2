"""Grow a trained ResNet9 to a larger width without changing what it computes.

A width-0.5 model that has stopped improving can seed a width-0.75 or 1.0 run
(``emotion-train fit --width 0.75 --init narrow.safetensors``): the wide model
starts with the narrow one's accuracy instead of from scratch, which saves most
of the epochs a wide run would need on a CPU.

The method is Net2WiderNet (Chen, Goodfellow and Shlens, "Net2Net: Accelerating
learning via knowledge transfer", ICLR 2016): each new channel copies an
existing one (its convolution filter, bias and BatchNorm statistics), and the
layer that reads both splits its weight for that channel between them. Here
the split is random per output, not in equal halves, so the copies receive
different gradients and grow apart from the first step; the outputs are still
the same as the narrow model's, up to rounding.
"""

from __future__ import annotations

import torch
from torch import nn

from worker.model import ResNet9

# The three stages of ResNet9 and the conv blocks in each; every block of a stage
# writes the stage's channels (the residual sums need them to line up).
_STAGES = (
    ("conv1", "conv2", "res1.0", "res1.1"),
    ("conv3", "conv4", "res2.0", "res2.1"),
    ("conv5", "conv6", "res3.0", "res3.1"),
)


def widen(narrow: ResNet9, width: float, generator: torch.Generator | None = None) -> ResNet9:
    """A ResNet9 of ``width`` (at least ``narrow.width``) that computes what ``narrow`` computes."""
    if width < narrow.width:
        raise ValueError(f"cannot widen a width-{narrow.width} model to the smaller width {width}")
    gen = generator or torch.Generator().manual_seed(0)
    num_classes = narrow.classifier[-1].out_features
    in_channels = narrow.conv1[0].in_channels
    wide = ResNet9(num_classes, width, in_channels)
    blocks_narrow = dict(narrow.named_modules())
    blocks_wide = dict(wide.named_modules())

    with torch.no_grad():
        src_in = torch.arange(in_channels)  # the grey input is never widened
        for stage in _STAGES:
            n = blocks_narrow[stage[0]][0].out_channels
            m = blocks_wide[stage[0]][0].out_channels
            src = _channel_map(n, m, gen)
            for name in stage:
                _copy_block(blocks_narrow[name], blocks_wide[name], src_in, src, gen)
                src_in = src
        _copy_linear(narrow.classifier[-1], wide.classifier[-1], src_in, gen)
    return wide


def _channel_map(n: int, m: int, gen: torch.Generator) -> torch.Tensor:
    """For each of ``m`` new channels, the old channel it copies: the first ``n`` keep their own,
    the rest copy old channels drawn at random, each as evenly often as ``m - n`` allows."""
    rounds = -(-(m - n) // n)
    extra = [torch.randperm(n, generator=gen) for _ in range(rounds)]
    return torch.cat([torch.arange(n), *extra])[:m]


def _split(out_features: int, src_in: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Factors (out_features x new inputs) that split each old input's weight among its copies:
    positive, random, and summing to 1 over the copies of one old input, for every output."""
    r = torch.rand(out_features, len(src_in), generator=gen) + 0.5
    total = torch.zeros(out_features, int(src_in.max()) + 1).index_add_(1, src_in, r)
    return r / total[:, src_in]


def _copy_block(narrow: nn.Sequential, wide: nn.Sequential, src_in, src_out, gen) -> None:
    conv_n, bn_n = narrow[0], narrow[1]
    conv_w, bn_w = wide[0], wide[1]
    weight = conv_n.weight[src_out][:, src_in]
    conv_w.weight.copy_(weight * _split(len(src_out), src_in, gen)[:, :, None, None])
    conv_w.bias.copy_(conv_n.bias[src_out])
    for attr in ("weight", "bias", "running_mean", "running_var"):
        getattr(bn_w, attr).copy_(getattr(bn_n, attr)[src_out])
    bn_w.num_batches_tracked.copy_(bn_n.num_batches_tracked)


def _copy_linear(narrow: nn.Linear, wide: nn.Linear, src_in, gen) -> None:
    wide.weight.copy_(narrow.weight[:, src_in] * _split(narrow.out_features, src_in, gen))
    wide.bias.copy_(narrow.bias)
