"""Our MoVQ vs diffusers' VQModel: same parameter counts, and from_diffusers reproduces its reconstructions."""
import pytest
import torch

from movq_deploy.models.blocks import SpatialNorm
from movq_deploy.models.movq import MoVQ, MoVQConfig

diffusers = pytest.importorskip("diffusers")
VQModel = diffusers.VQModel


def small_vq_model(norm_type, seed=0):
    torch.manual_seed(seed)
    # Two levels (attention in the lower one, as the Kandinsky MoVQ), 32 channels: SpatialNorm needs 32 groups.
    return VQModel(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
                   up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"), layers_per_block=1,
                   latent_channels=4, num_vq_embeddings=16, norm_type=norm_type, sample_size=16).eval()


@pytest.mark.parametrize("norm_type", ["spatial", "group"])
def test_from_diffusers_reconstructs_like_diffusers(norm_type):
    ref = small_vq_model(norm_type)
    model = MoVQ.from_diffusers(ref).eval()
    cfg = model.config
    assert cfg.modulation == ("all" if norm_type == "spatial" else "none") and cfg.num_chunks == 1
    assert model.num_parameters() == sum(p.numel() for p in ref.parameters())
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        _, _, (_, _, ref_indices) = ref.quantize(ref.encode(x).latents)
        indices = model.encode(x)
        assert torch.equal(indices.flatten(), ref_indices.flatten())
        err = (model.reconstruct(x) - ref(x).sample).abs().max().item()
    assert err < 1e-5, f"float32 max abs difference {err}"
    # In float64 the two graphs agree to rounding: no structural difference hides under the 1e-5.
    ref64, model64, x64 = ref.double(), model.double(), x.double()
    with torch.no_grad():
        err64 = (model64.reconstruct(x64) - ref64(x64).sample).abs().max().item()
    assert err64 < 1e-10


def test_spatial_model_uses_quant_before_post_quant_conv_as_modulation():
    model = MoVQ.from_diffusers(small_vq_model("spatial"))
    norms = [m for m in model.decoder.modules() if isinstance(m, SpatialNorm)]
    assert norms and all(n.conv_y.in_channels == model.config.latent_channels for n in norms)


def test_vqgan_f16_counts_like_diffusers():
    with torch.device("meta"):
        ref = VQModel(block_out_channels=(128, 128, 256, 256, 512), layers_per_block=2, latent_channels=256,
                      num_vq_embeddings=1024, norm_type="group",
                      down_block_types=("DownEncoderBlock2D",) * 4 + ("AttnDownEncoderBlock2D",),
                      up_block_types=("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * 4)
        ours = MoVQ(MoVQConfig.preset("vqgan-f16"))
        assert MoVQ.config_from_diffusers(ref, image_size=256) == MoVQConfig.preset("vqgan-f16")
    assert ours.num_parameters() == sum(p.numel() for p in ref.parameters()) == 72_141_699


def test_kandinsky_movq_config_maps():
    # Kandinsky 2.2's MoVQ (diffusers scripts/convert_kandinsky_to_diffusers.py, MOVQ_CONFIG), on the meta device.
    with torch.device("meta"):
        ref = VQModel(block_out_channels=(128, 256, 256, 512), layers_per_block=2, latent_channels=4,
                      vq_embed_dim=4, num_vq_embeddings=16384, norm_type="spatial",
                      down_block_types=("DownEncoderBlock2D",) * 3 + ("AttnDownEncoderBlock2D",),
                      up_block_types=("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * 3)
        cfg = MoVQ.config_from_diffusers(ref, image_size=256)
        ours = MoVQ(cfg)
    assert cfg.grid == (32, 32, 1) and cfg.codebook_size == 16384 and cfg.modulation == "all"
    n = sum(p.numel() for p in ref.parameters())
    assert ours.num_parameters() == n and round(n / 1e6, 1) == 67.8


def test_unsupported_diffusers_model_is_refused():
    with torch.device("meta"):
        asymmetric = VQModel(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
                             down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                             up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"))
    with pytest.raises(ValueError, match="does not mirror"):
        MoVQ.config_from_diffusers(asymmetric)
