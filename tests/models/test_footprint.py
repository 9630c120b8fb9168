"""The measured memory of a call: one item's share of its peak, what it holds whatever the batch, and every tensor
it allocates, against what a small network must hold."""
import torch

from movq_deploy.memory import MemoryBudget
from movq_deploy.models import footprint


def _net():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3, padding=1), torch.nn.SiLU(),
                               torch.nn.Conv2d(64, 64, 3, padding=1)).eval()


def test_a_forward_is_charged_its_live_activations_per_item():
    net, size = _net(), 64
    feature = 64 * size * size * 4  # one fp32 feature map of one image

    @torch.no_grad()
    def forward(batch):
        net(torch.zeros(batch, 3, size, size))

    cost = footprint.measure(forward)
    raw_per_item = cost.peak_per_item / footprint.MARGIN
    # the input, the SiLU's input and output (held together), then the last conv's output: 2-3 feature maps
    assert 2 * feature <= raw_per_item <= 3.2 * feature
    assert cost.peak_fixed < feature  # nothing else grows the peak
    # allocated over the call: every feature map, whether held at the peak or not
    assert cost.allocated_per_item >= cost.peak_per_item


def test_what_does_not_grow_with_the_batch_is_fixed():
    weights = torch.zeros(1024, 1024)  # 4 MB, made on every call whatever the batch

    def call(batch):
        torch.zeros(batch, 1024) @ (weights + 1)

    cost = footprint.measure(call)
    assert cost.peak_fixed / footprint.MARGIN >= 0.95 * weights.numel() * 4
    assert cost.peak_per_item / footprint.MARGIN <= 3 * 1024 * 4  # a row in, a row out
    assert cost.peak(8) == cost.peak_fixed + 8 * cost.peak_per_item


def test_the_batch_fits_the_budget():
    net, size = _net(), 64

    @torch.no_grad()
    def forward(batch):
        net(torch.zeros(batch, 3, size, size))

    cost = footprint.measure(forward)
    assert footprint.batch_size(forward, MemoryBudget(5 * cost.peak_per_item + cost.peak_fixed, "test"), "x") in (4, 5, 6)


def test_measuring_leaves_the_random_streams_as_they_were():
    dropout = torch.nn.Dropout(0.5).train()

    def call(batch):
        dropout(torch.ones(batch, 256))

    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    footprint.measure(call)
    assert torch.equal(torch.rand(4), expected)
