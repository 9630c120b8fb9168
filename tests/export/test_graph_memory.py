"""Each graph's memory per image, measured at export on its module, and the rows per call it allows."""
import pytest

from movq_deploy.export.memory import GraphMemory, graph_footprint
from movq_deploy.memory import MemoryBudget, MemoryBudgetError


def test_rows_per_call_by_peak_or_by_every_tensor():
    memory = GraphMemory(MemoryBudget(1000, "test"), {"decoder": {"peak": 100, "allocated": 400}})
    assert memory.rows("decoder", "comparing") == 10
    assert memory.rows("decoder", "calibrating", every_tensor=True) == 2
    assert memory.rows("decoder", "comparing", most=4) == 4
    with pytest.raises(MemoryBudgetError, match=r"calibrating \(decoder graph\) needs"):
        GraphMemory(MemoryBudget(300, "test"), {"decoder": {"peak": 100, "allocated": 400}}).rows(
            "decoder", "calibrating", every_tensor=True)


def test_the_decoder_costs_more_per_image_than_the_prior_step_and_its_manifest_says_so(exported):
    """Measured on the test model's modules: every graph's figures are positive, the calibration figure (every
    tensor) at least the peak; the manifest carries them."""
    out, manifest, _ = exported
    for graph, entry in manifest["graphs"]["fp32"].items():
        cost = entry["memory_per_image"]
        assert 0 < cost["peak"] <= cost["allocated"], graph


def test_graph_footprint_grows_with_the_image_size():
    import dataclasses

    import torch

    from movq_deploy.export.specs import graph_specs
    from movq_deploy.models.movq import MoVQ, MoVQConfig
    from movq_deploy.models.prior import MaskGITPrior, PriorConfig

    torch.manual_seed(0)
    costs = []
    for size in (32, 64):
        config = dataclasses.replace(MoVQConfig.preset("tiny"), image_size=size)
        movq = MoVQ(config).eval()
        specs = graph_specs(movq, MaskGITPrior(PriorConfig.preset("tiny", config)).eval())
        costs.append(graph_footprint(specs["decoder"])["peak"])
    assert 3 * costs[0] <= costs[1] <= 5 * costs[0]  # 4x the pixels
