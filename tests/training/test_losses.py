"""The tokenizer's adversarial loss: PatchGAN logits, the hinge loss, VQGAN's adaptive weight."""
import torch

from movq_deploy.training.losses import PatchDiscriminator, adaptive_gan_weight, hinge_d_loss


def test_patch_discriminator_gives_a_grid_of_logits():
    torch.manual_seed(0)
    disc = PatchDiscriminator(channels=8, layers=2)
    assert disc(torch.randn(2, 3, 32, 32)).shape == (2, 1, 6, 6)  # 32 -> 16 -> 8 (stride 2), then two 4x4 stride-1 convs: 7, 6


def test_hinge_loss_is_zero_only_beyond_the_margins():
    confident = hinge_d_loss(torch.full((4,), 2.0), torch.full((4,), -2.0))
    unsure = hinge_d_loss(torch.zeros(4), torch.zeros(4))
    assert float(confident) == 0.0 and float(unsure) == 1.0


def test_adaptive_weight_is_the_ratio_of_gradient_norms():
    last_layer = torch.nn.Parameter(torch.ones(3))
    nll, g_loss = (4.0 * last_layer).sum(), (2.0 * last_layer).sum()  # gradients 4 and 2 per element
    weight = adaptive_gan_weight(nll, g_loss, last_layer)
    torch.testing.assert_close(weight, torch.tensor(4.0 * 3 ** 0.5 / (2.0 * 3 ** 0.5 + 1e-4)))
    assert not weight.requires_grad
