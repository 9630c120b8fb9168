import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from movq_deploy.models.checkpoint import load_models, save_checkpoint
from movq_deploy.models.initial_feature import FOURIER_SIGMA, sinusoid_table
from movq_deploy.models.blocks import SpatialNorm
from movq_deploy.models.movq import MoVQ, MoVQConfig
from movq_deploy.models.quantizer import MultichannelQuantizer


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return MoVQ(dataclasses.replace(MoVQConfig.preset("tiny"), **overrides))


# ---- quantizer ---------------------------------------------------------------------------------------------------


def plain_vq(z, codebook, beta):
    """Textbook VQ-VAE/VQGAN quantizer (one code per position, cdist argmin), written independently."""
    B, C, H, W = z.shape
    flat = z.permute(0, 2, 3, 1).reshape(-1, C)
    idx = torch.cdist(flat, codebook).argmin(1)
    zq = codebook[idx].reshape(B, H, W, C).permute(0, 3, 1, 2)
    loss = ((zq - z.detach()) ** 2).mean() + beta * ((zq.detach() - z) ** 2).mean()
    return idx.reshape(B, H, W), zq, loss


def test_single_chunk_quantizer_equals_plain_vq():
    torch.manual_seed(0)
    q = MultichannelQuantizer(codebook_size=32, code_dim=8, num_chunks=1, beta=0.25)
    torch.nn.init.normal_(q.codebook.weight)
    z = torch.randn(3, 8, 5, 4)
    zq, loss, info = q(z)
    ref_idx, ref_zq, ref_loss = plain_vq(z, q.codebook.weight, 0.25)
    assert info["indices"].shape == (3, 5, 4, 1) and info["indices"].dtype == torch.int64
    assert torch.equal(info["indices"][..., 0], ref_idx)
    torch.testing.assert_close(zq, ref_zq)
    torch.testing.assert_close(loss, ref_loss)


def test_chunks_share_one_codebook_and_keep_channel_order():
    torch.manual_seed(0)
    K, d, c = 16, 4, 3
    q = MultichannelQuantizer(codebook_size=K, code_dim=d, num_chunks=c, beta=0.25)
    assert [p.shape for p in q.parameters()] == [torch.Size([K, d])]  # one codebook, no per-chunk tables
    torch.nn.init.normal_(q.codebook.weight)
    want = torch.randint(0, K, (2, 3, 3, c))  # (B, h, w, c)
    # Build z whose chunk j at every position is exactly codebook[want[..., j]]: channels j*d:(j+1)*d.
    z = q.codebook.weight.detach()[want].reshape(2, 3, 3, c * d).permute(0, 3, 1, 2)
    assert torch.equal(q.nearest(z), want)
    torch.testing.assert_close(q.lookup(want), z)
    assert torch.equal(q.lookup(want.int()), q.lookup(want))  # int32 indices (the ONNX graphs') work too


def test_straight_through_gradient_and_loss_terms():
    torch.manual_seed(0)
    q = MultichannelQuantizer(codebook_size=8, code_dim=2, num_chunks=2, beta=0.25)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    weight = torch.randn(2, 4, 3, 3)
    zq, loss, info = q(z)
    (zq * weight).sum().backward()
    torch.testing.assert_close(z.grad, weight)  # d z_q / d z = identity
    z.grad = None
    _, loss, info = q(z)
    loss.backward()
    # codebook term moves only the codebook; commitment term (beta) moves only z.
    torch.testing.assert_close(loss, info["codebook_loss"] + 0.25 * info["commitment_loss"])
    zq_hard = q.lookup(info["indices"]).detach()
    torch.testing.assert_close(z.grad, 0.25 * 2 * (z - zq_hard).detach() / z.numel())
    assert q.codebook.weight.grad.abs().sum() > 0


def test_forward_info_and_gradient_reaches_encoder():
    model = tiny_model()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    x_rec, quant_loss, info = model(x)
    h, w, c = model.config.grid
    assert x_rec.shape == x.shape and quant_loss.dim() == 0
    assert info["indices"].shape == (2, h, w, c)
    counts = info["code_counts"]
    assert counts.shape == (model.config.codebook_size,) and counts.sum() == 2 * h * w * c
    assert 1.0 <= info["perplexity"] <= (counts > 0).sum() + 1e-3
    assert torch.equal(info["indices"], model.encode(x))
    x_rec.square().mean().backward()  # reconstruction only: reaches the encoder through the straight-through path
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert model.last_layer_weight is model.decoder.conv_out.weight
    assert model.last_layer_weight.grad.abs().sum() > 0


# ---- modulation (paper eq. 4) ------------------------------------------------------------------------------------


def test_spatial_norm_is_eq4_with_nearest_resize():
    torch.manual_seed(0)
    norm = SpatialNorm(channels=8, zq_channels=3, groups=4)
    for p in norm.parameters():
        torch.nn.init.normal_(p)
    f = torch.randn(2, 8, 8, 8)
    zq = torch.randn(2, 3, 2, 2)
    # Nearest resize by 4 == each z_q pixel repeated over its 4x4 cell.
    zq_big = zq.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)
    gamma = torch.einsum("oc,bchw->bohw", norm.conv_y.weight[:, :, 0, 0], zq_big) + norm.conv_y.bias[:, None, None]
    beta = torch.einsum("oc,bchw->bohw", norm.conv_b.weight[:, :, 0, 0], zq_big) + norm.conv_b.bias[:, None, None]
    groupnorm = F.group_norm(f, 4, norm.norm_layer.weight, norm.norm_layer.bias, eps=1e-6)
    torch.testing.assert_close(norm(f, zq), groupnorm * gamma + beta)
    # gamma varies over space with z_q: two cells with different codes get different scales.
    assert not torch.allclose(gamma[..., 0, 0], gamma[..., 0, 4])


def test_spatial_norm_affine_groupnorm_folds_into_eq4():
    """gamma(z)(a x^ + b) + beta(z) == gamma'(z) x^ + beta'(z) with gamma' = a gamma, beta' = beta + b gamma: both
    1x1 convs of z again, so the affine GroupNorm (kept for diffusers' weights) adds no function beyond eq. 4."""
    torch.manual_seed(0)
    norm = SpatialNorm(channels=8, zq_channels=3, groups=4)
    for p in norm.parameters():
        torch.nn.init.normal_(p)
    a, b = norm.norm_layer.weight.detach(), norm.norm_layer.bias.detach()
    wy, by = norm.conv_y.weight.detach()[:, :, 0, 0], norm.conv_y.bias.detach()
    wb, bb = norm.conv_b.weight.detach()[:, :, 0, 0], norm.conv_b.bias.detach()
    f, zq = torch.randn(2, 8, 4, 4), torch.randn(2, 3, 2, 2)
    z = F.interpolate(zq, size=(4, 4), mode="nearest")
    gamma = torch.einsum("oc,bchw->bohw", a[:, None] * wy, z) + (a * by)[:, None, None]
    beta = torch.einsum("oc,bchw->bohw", wb + b[:, None] * wy, z) + (bb + b * by)[:, None, None]
    x_hat = F.group_norm(f, 4, eps=1e-6)  # eq. 4's normalised feature, no affine
    torch.testing.assert_close(norm(f, zq), x_hat * gamma + beta, rtol=1e-4, atol=1e-5)


def count_spatial_norms(module):
    return sum(isinstance(m, SpatialNorm) for m in module.modules())


def test_modulation_placement():
    base = MoVQConfig.preset("tiny")  # 4 levels, modulation "first", k = 3
    with torch.device("meta"):
        models = {k: MoVQ(dataclasses.replace(base, modulation="first", modulated_levels=k)) for k in range(5)}
        none = MoVQ(dataclasses.replace(base, modulation="none"))
        full = MoVQ(dataclasses.replace(base, modulation="all"))
    assert count_spatial_norms(none) == 0
    for m in [*models.values(), none, full]:
        assert count_spatial_norms(m.encoder) == 0
    m3 = models[3].decoder
    assert [count_spatial_norms(level) > 0 for level in m3.up_blocks] == [True, True, True, False]
    assert count_spatial_norms(m3.mid_block) == 4 + 1  # 2 resnets x 2 norms + the attention norm
    assert not isinstance(m3.conv_norm_out, SpatialNorm)
    counts = [count_spatial_norms(models[k]) for k in range(5)]
    assert counts == sorted(counts) and len(set(counts)) == 5  # each extra level adds modulated norms
    assert counts[4] == count_spatial_norms(full)  # first-L == all
    assert isinstance(full.decoder.conv_norm_out, SpatialNorm)


def test_decoder_output_depends_on_modulation_input():
    model = tiny_model().eval()
    zq = torch.randn(1, model.config.latent_channels, 8, 8)
    with torch.no_grad():
        h = model.post_quant_conv(zq)
        a = model.decoder(h, zq)
        b = model.decoder(h, zq.flip(-1))  # same decoder input, different modulation map
    assert (a - b).abs().max() > 1e-4


# ---- presets, sizes, config --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,image,grid", [("paper-f16", 256, (16, 16, 4)), ("vqgan-f16", 256, (16, 16, 1)),
                                             ("tiny", 64, (8, 8, 4)), ("digits", 32, (4, 4, 4))])
def test_preset_shapes(name, image, grid):
    cfg = MoVQConfig.preset(name)
    assert cfg.image_size == image and cfg.grid == grid and cfg.latent_size == grid[0]
    assert cfg.code_dim * cfg.num_chunks == cfg.latent_channels
    with torch.device("meta"):  # shape propagation only: fast for the 256² presets
        model = MoVQ(cfg)
        x = torch.empty(2, 3, image, image)
        indices = model.encode(x)
        assert indices.shape == (2, *grid) and indices.dtype == torch.int64
        assert model.decode(indices).shape == (2, 3, image, image)
        x_rec, _, info = model(x)
        assert x_rec.shape == x.shape and info["indices"].shape == (2, *grid)


def test_paper_preset_details():
    paper, vqgan = MoVQConfig.preset("paper-f16"), MoVQConfig.preset("vqgan-f16")
    assert paper.block_out_channels == (128, 128, 256, 256, 512) and paper.layers_per_block == 2
    assert paper.norm_groups == 32 and paper.has_attention(4) and not paper.has_attention(3)
    assert (paper.latent_channels, paper.num_chunks, paper.code_dim, paper.codebook_size) == (256, 4, 64, 1024)
    assert paper.modulation == "first" and paper.modulated_levels == 3 and paper.f0 == "fourier"
    assert (vqgan.num_chunks, vqgan.code_dim, vqgan.codebook_size, vqgan.modulation) == (1, 256, 1024, "none")


def test_vqgan_f16_has_72_1m_parameters():
    with torch.device("meta"):
        n = MoVQ(MoVQConfig.preset("vqgan-f16")).num_parameters()
    assert n == 72_141_699  # = diffusers VQModel of the same config (checked in test_diffusers_parity.py)
    assert round(n / 1e6, 1) == 72.1


def test_real_tiny_round_trip_shapes_and_dtypes():
    model = tiny_model().eval()
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        indices = model.encode(x)
        assert indices.shape == (3, 8, 8, 4) and int(indices.max()) < model.config.codebook_size
        x_rec = model.decode(indices.int())  # int32 indices, as the ONNX graphs carry them
        assert x_rec.shape == x.shape
        torch.testing.assert_close(model.decode(indices), x_rec)
        # forward reconstructs from the same codes (z + sg(z_q - z) differs from z_q only by rounding)
        torch.testing.assert_close(model(x)[0], x_rec, atol=1e-4, rtol=0)


def test_bad_inputs_raise_one_line_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="expected images"):
        model.encode(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="expected indices"):
        model.decode(torch.zeros(1, 8, 8, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="unknown MoVQ preset"):
        MoVQConfig.preset("huge")
    with pytest.raises(ValueError, match="num_chunks"):
        MoVQConfig(latent_channels=10, num_chunks=4)
    with pytest.raises(ValueError, match="modulation"):
        MoVQConfig(modulation="some")
    with pytest.raises(ValueError, match="unknown MoVQConfig keys"):
        MoVQConfig.from_dict({**MoVQConfig().to_dict(), "bogus": 1})
    for bad in ({"num_chunks": 0}, {"norm_groups": 0}, {"image_size": 0}, {"pre_quant_channels": 0}):
        with pytest.raises(ValueError, match="sizes must be positive"):
            MoVQConfig(**bad)


@pytest.mark.parametrize("name", ["paper-f16", "vqgan-f16", "tiny", "digits"])
def test_to_dict_from_dict_round_trip_through_json(name):
    cfg = MoVQConfig.preset(name)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert MoVQConfig.from_dict(d) == cfg
    assert isinstance(d["block_out_channels"], list)


def test_same_bit_budget_baseline_recipe():
    tiny = MoVQConfig.preset("tiny")
    baseline = dataclasses.replace(tiny, block_out_channels=tiny.block_out_channels[1:], num_chunks=1,
                                   modulation="none")
    assert baseline.grid == (16, 16, 1) and baseline.codebook_size == tiny.codebook_size
    bits = lambda c: c.num_tokens * math.log2(c.codebook_size)  # noqa: E731
    assert bits(baseline) == bits(tiny)
    with torch.device("meta"):
        x_rec, _, info = MoVQ(baseline)(torch.empty(2, 3, 64, 64))
    assert x_rec.shape == (2, 3, 64, 64) and info["indices"].shape == (2, 16, 16, 1)


# ---- the initial feature F0 (paper §3.1, Fig. 6a row C) ----------------------------------------------------------


@pytest.mark.parametrize("f0,count", [("conv", 77_340_035), ("fourier", 77_274_243), ("sinusoid", 77_274_243),
                                      ("learned", 77_339_779)])
def test_paper_f16_parameter_count_per_initial_feature(f0, count):
    with torch.device("meta"):
        model = MoVQ(dataclasses.replace(MoVQConfig.preset("paper-f16"), f0=f0))
    assert model.num_parameters() == count
    # conv: post_quant_conv 256x256 + 256; fourier/sinusoid: none (buffers); learned: a 256x16x16 constant.
    assert count - 77_340_035 == {"conv": 0, "fourier": -65_792, "sinusoid": -65_792, "learned": -256}[f0]


def test_fourier_feature_is_cos_sin_of_a_fixed_gaussian_projection():
    model = tiny_model(f0="fourier").eval()
    cfg = model.config
    two_pi_b = model.initial_feature.frequencies[:, :, 0, 0]  # (z_channels / 2, n_z)
    assert two_pi_b.shape == (cfg.z_channels // 2, cfg.latent_channels)
    assert not any(two_pi_b is p for p in model.parameters())  # fixed: a buffer, stored with the weights
    assert "initial_feature.frequencies" in model.state_dict()
    b_std = float((two_pi_b / (2 * math.pi)).std())
    assert abs(b_std - FOURIER_SIGMA / math.sqrt(cfg.latent_channels)) < 0.2 * b_std  # 2048 samples: ~2% error
    zq = torch.randn(2, cfg.latent_channels, 8, 8)
    phase = torch.einsum("fc,bchw->bfhw", two_pi_b, zq)
    torch.testing.assert_close(model.initial_feature(zq), torch.cat([phase.cos(), phase.sin()], 1))
    with torch.no_grad():  # per position: changing one position's code changes F0 there only
        zq2 = zq.clone()
        zq2[:, :, 3, 5] += 1.0
        moved = (model.initial_feature(zq2) - model.initial_feature(zq)).abs().sum(1) > 0
    assert moved[:, 3, 5].all() and moved.sum() == 2


def test_sinusoid_table_is_the_2d_transformer_embedding():
    table = sinusoid_table(8, 3, 4)  # width 8: 2 frequencies each for sin y, cos y, sin x, cos x
    assert table.shape == (1, 8, 3, 4)
    y, x = 2, 3
    expected = [math.sin(y), math.sin(y / 100), math.cos(y), math.cos(y / 100),
                math.sin(x), math.sin(x / 100), math.cos(x), math.cos(x / 100)]
    torch.testing.assert_close(table[0, :, y, x], torch.tensor(expected))


@pytest.mark.parametrize("f0", ["sinusoid", "learned"])
def test_positional_and_learned_f0_carry_no_code_so_z_q_enters_by_modulation_only(f0):
    model = tiny_model(f0=f0).eval()
    zq = torch.randn(2, model.config.latent_channels, 8, 8)
    start = model.initial_feature(zq)
    assert torch.equal(start, model.initial_feature(zq.flip(0)))  # the same F0 whatever the codes
    assert torch.equal(start[0], start[1])
    with torch.no_grad():
        a, b = model.decode_quantized(zq), model.decode_quantized(zq.flip(0))
    assert (a - b.flip(0)).abs().max() < 1e-5 and (a[0] - a[1]).abs().max() > 1e-4  # the codes still steer it
    with pytest.raises(ValueError, match="needs a modulated decoder"):
        dataclasses.replace(model.config, modulation="none")


@pytest.mark.parametrize("f0", ["conv", "fourier", "sinusoid", "learned"])
def test_every_initial_feature_trains(f0):
    model = tiny_model(f0=f0)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    x_rec, quant_loss, _ = model(x)
    ((x_rec - x).abs().mean() + quant_loss).backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0 and model.decoder.conv_in.weight.grad.abs().sum() > 0
    if f0 == "learned":
        assert model.initial_feature.constant.grad.abs().sum() > 0


def test_checkpoints_without_f0_load_as_conv(tmp_path):
    model = tiny_model(seed=3).eval()
    old_config = model.config.to_dict()
    del old_config["f0"]  # what checkpoints written before F0 had a choice hold
    path = save_checkpoint(tmp_path / "ckpt.pt", tokenizer_config=old_config, tokenizer=model.state_dict())
    loaded, _, _ = load_models(path)
    assert loaded.config.f0 == "conv"
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded.reconstruct(x), model.reconstruct(x))


def test_bad_f0_is_a_one_line_error():
    with pytest.raises(ValueError, match="f0 must be one of"):
        MoVQConfig(f0="fft")
    with pytest.raises(ValueError, match="z_channels divisible by 2"):
        MoVQConfig(f0="fourier", pre_quant_channels=7)
