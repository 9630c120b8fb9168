"""MaskGITPrior and PriorConfig."""
import pytest
import torch

from movq_deploy.models.movq import MoVQConfig
from movq_deploy.models.prior import MaskGITPrior, PriorConfig


def small_config(num_classes=0, **overrides):
    base = dict(h=2, w=3, c=4, codebook_size=11, num_classes=num_classes, width=32, depth=2, heads=2, mlp_dim=64,
                dropout=0.0, class_dropout=0.5)
    return PriorConfig(**{**base, **overrides})


def test_presets_follow_the_tokenizer_and_paper_has_about_307m_parameters():
    tokenizer = MoVQConfig.preset("paper-f16")
    paper = PriorConfig.preset("paper", tokenizer)
    assert (paper.grid, paper.codebook_size, paper.mask_id, paper.num_slots) == ((16, 16, 4), 1024, 1024, 1024)
    assert (paper.depth, paper.heads, paper.width, paper.mlp_dim) == (24, 16, 1024, 4096)
    with torch.device("meta"):  # counts without allocating 1.2 GB
        count = MaskGITPrior(paper).num_parameters()
    assert 300e6 < count < 315e6
    tiny = PriorConfig.preset("tiny", MoVQConfig.preset("tiny"), num_classes=3)
    assert tiny.grid == (8, 8, 4) and tiny.num_classes == 3 and tiny.conditional
    with pytest.raises(ValueError, match="preset"):
        PriorConfig.preset("huge", tokenizer)


def test_config_round_trip_and_validation():
    config = small_config(num_classes=5)
    assert PriorConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown"):
        PriorConfig.from_dict({**config.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="divisible"):
        small_config(width=30)


def test_forward_shapes_and_bidirectional_context():
    torch.manual_seed(0)
    config = small_config()
    prior = MaskGITPrior(config).eval()
    tokens = torch.randint(0, config.mask_id + 1, (3, config.num_slots))
    with torch.no_grad():
        logits = prior(tokens)
        changed = tokens.clone()
        changed[:, -1] = (changed[:, -1] + 1) % config.codebook_size  # the last slot of the last position
        logits_changed = prior(changed)
    assert logits.shape == (3, config.num_slots, config.codebook_size)
    # Bidirectional: a change at the end reaches the first position.
    assert not torch.allclose(logits[:, :config.c], logits_changed[:, :config.c])
    # Each image is independent of the others in the batch.
    with torch.no_grad():
        torch.testing.assert_close(prior(tokens[1:2]), logits[1:2], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unconditional"):
        prior(tokens, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="tokens must be"):
        prior(tokens[:, :-1])


def test_class_conditioning():
    torch.manual_seed(0)
    config = small_config(num_classes=3)
    prior = MaskGITPrior(config).eval()
    tokens = torch.full((2, config.num_slots), config.mask_id)
    with torch.no_grad():
        a = prior(tokens, torch.tensor([0, 0]))
        b = prior(tokens, torch.tensor([1, 1]))
        null = prior(tokens, torch.tensor([3, 3]))
        default = prior(tokens)
    assert not torch.allclose(a, b)
    torch.testing.assert_close(default, null)  # no label = the null class
    prior.train()  # class dropout acts in training only
    torch.manual_seed(1)
    with torch.no_grad():
        dropped = prior(tokens.repeat(16, 1), torch.zeros(32, dtype=torch.long))
    rows_null = torch.isclose(dropped, null[:1], atol=1e-5).flatten(1).all(1)
    assert 0 < rows_null.sum() < 32


def test_configure_optimizers_decays_only_the_matrices():
    prior = MaskGITPrior(small_config(num_classes=3))
    opt = prior.configure_optimizers(weight_decay=0.05, learning_rate=1e-3)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0 and opt.defaults["lr"] == 1e-3
    names = {id(p): n for n, p in prior.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert "head.weight" in decayed and all(prior.get_parameter(n).dim() >= 2 for n in decayed)
    assert not {"token_embedding.weight", "class_embedding.weight", "position_embedding", "head.bias",
                "norm.weight"} & decayed
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(prior.parameters()))
