"""Growing a trained ResNet9 to a larger width (Net2WiderNet) keeps its outputs and lets copies diverge."""

from __future__ import annotations

import pytest
import torch

from training.widen import widen
from worker.model import ResNet9


def trained_like(width: float) -> ResNet9:
    """A small ResNet9 with random weights and BatchNorm statistics that are not the defaults."""
    torch.manual_seed(0)
    model = ResNet9(width=width)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
        model.train()
        for _ in range(3):
            model(torch.randn(8, 1, 48, 48) * 2 + 0.5)
    return model.eval()


@pytest.mark.parametrize("wide_width", [0.125, 0.1875, 0.25, 0.4])
def test_widened_model_computes_the_same_outputs(wide_width):
    narrow = trained_like(0.125)
    wide = widen(narrow, wide_width).eval()
    assert wide.width == wide_width
    assert wide.conv1[0].out_channels >= narrow.conv1[0].out_channels
    x = torch.randn(4, 1, 48, 48)
    with torch.no_grad():
        expected, got = narrow(x), wide(x)
    assert expected.abs().max() > 0.1  # a model whose outputs are all near zero would prove nothing
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_copied_channels_grow_apart_in_training():
    narrow = trained_like(0.125)
    wide = widen(narrow, 0.25).train()
    n = narrow.conv1[0].out_channels
    # Each new channel of conv1 (whose grey input is not widened) copies one of the first n
    # exactly; find its original by its filter.
    filters = wide.conv1[0].weight.detach().flatten(1)
    copy_of = [int((filters[:n] - filters[j]).abs().sum(1).argmin()) for j in range(n, 2 * n)]
    assert all(torch.equal(filters[j], filters[k]) for j, k in zip(range(n, 2 * n), copy_of))

    opt = torch.optim.SGD(wide.parameters(), lr=0.1)
    loss = torch.nn.functional.cross_entropy(wide(torch.randn(16, 1, 48, 48)), torch.randint(0, 7, (16,)))
    loss.backward()
    opt.step()
    after = wide.conv1[0].weight.detach().flatten(1)
    assert all(not torch.allclose(after[j], after[k]) for j, k in zip(range(n, 2 * n), copy_of))


def test_widen_refuses_a_smaller_width():
    with pytest.raises(ValueError, match="cannot widen a width-0.25 model to the smaller width 0.125"):
        widen(ResNet9(width=0.25), 0.125)
