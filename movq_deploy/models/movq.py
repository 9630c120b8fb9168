"""MoVQ tokenizer (Zheng et al., NeurIPS 2022): a VQGAN with a multichannel quantizer and a modulated decoder.

    image [B,3,H,W] -> Encoder -> conv_in... conv_out -> quant_conv -> z [B,n_z,h,w]
    z -> MultichannelQuantizer: n_z channels split into c chunks of d = n_z/c, each chunk snapped to its nearest
         entry of ONE shared codebook K x d -> indices [B,h,w,c], z_q [B,n_z,h,w]
    z_q -> F0 (the initial feature) -> Decoder (its norms modulated by z_q, paper eq. 4) -> image [B,3,H,W]

The module layout mirrors diffusers' `VQModel` (Encoder/Decoder of models/autoencoders/vae.py, the
Down/UpEncoderBlock2D family, SpatialNorm) so that `MoVQ.from_diffusers` is a key rename, and so that the
"vqgan-f16" preset counts exactly the parameters of the equivalent diffusers model (72.14M).

Two choices made here that the paper leaves open, stated once:
- "Modulation in the first k decoder blocks" (modulation="first", modulated_levels=k): the decoder's mid block and
  its first k up levels, counted from the decoder input (lowest resolution first), use the modulated norm (every
  GroupNorm of those resnets and attention blocks); the remaining, higher-resolution levels and the final norm use
  plain GroupNorm. With k = number of levels the final norm is modulated too, i.e. "first" with k = L == "all"
  == diffusers' norm_type="spatial". "paper-f16" uses k = 3: mid block + the 16², 32² and 64² levels.
- The modulation input is z_q (n_z channels) BEFORE post_quant_conv, as in diffusers and ai-forever/MoVQGAN;
  gamma and beta are two pointwise (1x1) convolutions of it, as the paper's figure and project page describe.
- The initial feature F0 (`f0`; what the decoder's conv_in receives, z_channels wide, at the latent grid):
  "conv" = post_quant_conv(z_q), VQGAN's and diffusers' (and every checkpoint written before `f0` existed);
  "fourier" = the paper's choice (§3.1, Fig. 6a row C): per position gamma(z_q) = [cos 2piB.z_q, sin 2piB.z_q]
  (Tancik et al. 2020) with B a fixed Gaussian matrix [z_channels/2, n_z], entries N(0, sigma^2 / n_z), sigma = 1
  (initial_feature.FOURIER_SIGMA): each frequency's phase 2pi b.z_q then has a standard deviation of 2pi * sigma *
  rms(z_q), about one turn for unit-scale codes, so codes a fraction of their spread apart get distinct features
  (low sigma would blur neighbouring codes together, very high sigma makes the features of a code jump while the
  codebook is still moving). The width equals the conv's output it replaces, so conv_in keeps its shape; B is a
  buffer stored with the weights, so export and reference use the same matrix.
  "sinusoid" (a 2-D sinusoidal positional embedding) and "learned" (a learned constant [z_channels, h, w]) carry
  no code identity: z_q then reaches the decoder only through the modulated norms, so they need modulation.

Parameter counts (encoder + decoder + quant convs + codebook; `MoVQ(cfg).num_parameters()`; f0 = "conv"):
- "vqgan-f16": 72,141,699 = diffusers' VQModel of that config = the paper's 72.1M.
- "paper-f16": 77,340,035 vs the paper's 82.7M. Relative to the VQGAN: +5.40M for the modulated norms
  (2·(n_z+1)·C per modulated GroupNorm: 26 of them, in the mid block and the 16², 32², 64² levels) and -0.20M for
  the smaller codebook (1024x64 instead of 1024x256). Modulating every decoder norm ("all") gives 78.26M; the
  paper does not describe its modulation layers in more detail than that, so its extra ~5.4M is not reproduced.
- "tiny": 890,035 (64² -> 8x8x4, K = 512, d = 16).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from movq_deploy.models.blocks import GroupNorm, make_norm, Level, MidBlock
from movq_deploy.models.initial_feature import make_initial_feature
from movq_deploy.models.quantizer import MultichannelQuantizer

MODULATIONS = ("none", "first", "all")
INITIAL_FEATURES = ("conv", "fourier", "sinusoid", "learned")


def config_from_dict(cls, d: dict):
    """The config dataclass `cls` from a plain dict (ckpt.pt, manifest.json); unknown keys are a ValueError."""
    unknown = set(d) - {f.name for f in fields(cls)}
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys: {sorted(unknown)}")
    return cls(**d)


@dataclass
class MoVQConfig:
    """Tokenizer hyper-parameters. Build one with `MoVQConfig.preset(name)` and adjust with `dataclasses.replace`.

    The same-bit-budget baseline VQGAN of the ablation (c = 1, a 16x16 grid instead of 8x8x4, same K, so both
    spend 256 * log2(K) bits per image) is the tiny preset with one fewer downsampling level::

        tiny = MoVQConfig.preset("tiny")
        baseline = dataclasses.replace(tiny, block_out_channels=tiny.block_out_channels[1:],
                                       num_chunks=1, modulation="none")
        assert baseline.grid == (16, 16, 1) and tiny.grid == (8, 8, 4)

    This drops the tiny preset's first (full-resolution, narrowest) level, so the baseline keeps the bottleneck
    width and about the same parameter count (0.79M vs 0.78M for tiny without modulation); its codebook holds K
    vectors of d = latent_channels instead of latent_channels / 4. (Cutting a level from a config that has
    `attention_levels` needs those indices shifted too.)
    """

    image_size: int = 64  # H = W of the input images
    in_channels: int = 3  # image channels (the decoder outputs as many)
    block_out_channels: tuple[int, ...] = (16, 16, 32, 64)  # encoder width per level; L levels -> f = 2^(L-1)
    layers_per_block: int = 1  # resnets per encoder level (the decoder has one more per level, as VQGAN)
    attention_levels: tuple[int, ...] = ()  # encoder level indices (0 = full resolution) with self-attention
    mid_attention: bool = True  # self-attention between the two resnets of the mid blocks
    norm_groups: int = 8  # GroupNorm groups everywhere (diffusers' SpatialNorm hard-codes 32)
    latent_channels: int = 64  # n_z: channels of z and z_q
    pre_quant_channels: int | None = None  # encoder output / decoder input width around the 1x1 quant convs
    #                                        (diffusers' latent_channels, taming's z_channels); None = n_z
    num_chunks: int = 4  # c: chunks per position, each quantized against the shared codebook
    codebook_size: int = 512  # K
    modulation: str = "first"  # "none" (VQGAN) | "first" (mid block + first `modulated_levels` up levels) | "all"
    modulated_levels: int = 3  # k, used when modulation == "first"
    beta: float = 0.25  # commitment weight
    f0: str = "conv"  # the decoder's initial feature: "conv" | "fourier" (the paper's) | "sinusoid" | "learned";
    #                   the default is what configs saved without the key were trained with

    def __post_init__(self):
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        self.attention_levels = tuple(int(i) for i in self.attention_levels)
        levels = len(self.block_out_channels)
        if levels < 1:
            raise ValueError("block_out_channels must name at least one level")
        sizes = (self.image_size, self.in_channels, self.layers_per_block, self.norm_groups, self.latent_channels,
                 self.num_chunks, *self.block_out_channels)
        if min(sizes) <= 0 or (self.pre_quant_channels is not None and self.pre_quant_channels <= 0):
            raise ValueError(f"MoVQConfig sizes must be positive: {self}")
        if self.modulation not in MODULATIONS:
            raise ValueError(f"modulation must be one of {MODULATIONS}, got {self.modulation!r}")
        if self.f0 not in INITIAL_FEATURES:
            raise ValueError(f"f0 must be one of {INITIAL_FEATURES}, got {self.f0!r}")
        if self.f0 in ("sinusoid", "learned") and self.modulation == "none":
            raise ValueError(f"f0 {self.f0!r} carries no code identity: it needs a modulated decoder "
                             "(modulation 'first' or 'all'), or z_q never reaches the decoder")
        if self.f0 in ("fourier", "sinusoid") and self.z_channels % (2 if self.f0 == "fourier" else 4):
            raise ValueError(f"f0 {self.f0!r} needs z_channels divisible by {2 if self.f0 == 'fourier' else 4}, "
                             f"got {self.z_channels}")
        if self.modulation == "first" and not 0 <= self.modulated_levels <= levels:
            raise ValueError(f"modulated_levels must be in [0, {levels}], got {self.modulated_levels}")
        if self.latent_channels % self.num_chunks:
            raise ValueError(f"latent_channels {self.latent_channels} is not divisible by num_chunks {self.num_chunks}")
        factor = 2 ** (levels - 1)
        if self.image_size % factor:
            raise ValueError(f"image_size {self.image_size} is not divisible by the downsampling factor {factor}")
        for ch in self.block_out_channels:
            if ch % self.norm_groups:
                raise ValueError(f"channel count {ch} is not divisible by norm_groups {self.norm_groups}")
        for i in self.attention_levels:
            if not 0 <= i < levels:
                raise ValueError(f"attention level {i} is out of range for {levels} levels")
        if self.codebook_size < 2:
            raise ValueError(f"codebook_size must be >= 2, got {self.codebook_size}")

    # ---- derived sizes -------------------------------------------------------------------------------------------
    @property
    def num_levels(self) -> int:
        return len(self.block_out_channels)

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (self.num_levels - 1)

    @property
    def latent_size(self) -> int:
        """h = w of the index grid."""
        return self.image_size // self.downsampling_factor

    @property
    def code_dim(self) -> int:
        """d: channels per chunk = width of a codebook vector."""
        return self.latent_channels // self.num_chunks

    @property
    def grid(self) -> tuple[int, int, int]:
        """(h, w, c) of the index tensor."""
        return (self.latent_size, self.latent_size, self.num_chunks)

    @property
    def num_tokens(self) -> int:
        """N = h*w*c."""
        h, w, c = self.grid
        return h * w * c

    @property
    def z_channels(self) -> int:
        return self.pre_quant_channels if self.pre_quant_channels is not None else self.latent_channels

    def has_attention(self, level: int) -> bool:
        """Whether encoder level `level` (0 = full resolution) has self-attention (its decoder mirror too)."""
        return level in self.attention_levels

    def is_modulated(self, up_level: int) -> bool:
        """Whether decoder up level `up_level` (0 = the lowest resolution, next to the mid block) is modulated."""
        if self.modulation == "none":
            return False
        return self.modulation == "all" or up_level < self.modulated_levels

    @property
    def modulates_mid(self) -> bool:
        return self.modulation != "none"

    @property
    def modulates_out(self) -> bool:
        return self.modulation == "all" or (self.modulation == "first" and self.modulated_levels == self.num_levels)

    # ---- (de)serialisation ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """A plain JSON-able dict (tuples become lists), as stored in ckpt.pt and manifest.json."""
        d = asdict(self)
        d["block_out_channels"] = list(self.block_out_channels)
        d["attention_levels"] = list(self.attention_levels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MoVQConfig":
        return config_from_dict(cls, d)

    @classmethod
    def preset(cls, name: str) -> "MoVQConfig":
        """"paper-f16" (MoVQ, 256² -> 16x16x4), "vqgan-f16" (its VQGAN baseline, 256² -> 16x16x1), "tiny" (64² ->
        8x8x4, the CPU default), "digits" (32² -> 4x4x4, the demo's handwritten digits)."""
        if name == "paper-f16":
            return cls(image_size=256, block_out_channels=(128, 128, 256, 256, 512), layers_per_block=2,
                       attention_levels=(4,), norm_groups=32, latent_channels=256, num_chunks=4,
                       codebook_size=1024, modulation="first", modulated_levels=3, f0="fourier")
        if name == "vqgan-f16":
            return cls(image_size=256, block_out_channels=(128, 128, 256, 256, 512), layers_per_block=2,
                       attention_levels=(4,), norm_groups=32, latent_channels=256, num_chunks=1,
                       codebook_size=1024, modulation="none")
        if name == "tiny":
            return cls()
        if name == "digits":  # the tiny model at 32²: 4x4x4 indices, Fourier F0 as the paper
            return cls(image_size=32, f0="fourier")
        raise ValueError(f"unknown MoVQ preset {name!r}; choose one of 'paper-f16', 'vqgan-f16', 'tiny', 'digits'")


class Encoder(nn.Module):
    def __init__(self, cfg: MoVQConfig):
        super().__init__()
        ch, g = cfg.block_out_channels, cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            Level(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, cfg.has_attention(i), g, None,
                  "down" if i < cfg.num_levels - 1 else None)
            for i in range(cfg.num_levels))
        self.mid_block = MidBlock(ch[-1], cfg.mid_attention, g, None)
        self.conv_norm_out = GroupNorm(ch[-1], g)
        self.conv_out = nn.Conv2d(ch[-1], cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, ch0, H, W)
        for level in self.down_blocks:
            h = level(h)
        h = self.mid_block(h)  # (B, ch[-1], h, w)
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, z_channels, h, w)


class Decoder(nn.Module):
    def __init__(self, cfg: MoVQConfig):
        super().__init__()
        rev, g, zc = tuple(reversed(cfg.block_out_channels)), cfg.norm_groups, cfg.latent_channels
        self.conv_in = nn.Conv2d(cfg.z_channels, rev[0], 3, padding=1)
        self.mid_block = MidBlock(rev[0], cfg.mid_attention, g, zc if cfg.modulates_mid else None)
        self.up_blocks = nn.ModuleList(
            Level(rev[max(i - 1, 0)], rev[i], cfg.layers_per_block + 1, cfg.has_attention(cfg.num_levels - 1 - i),
                  g, zc if cfg.is_modulated(i) else None, "up" if i < cfg.num_levels - 1 else None)
            for i in range(cfg.num_levels))
        self.conv_norm_out = make_norm(rev[-1], g, zc if cfg.modulates_out else None)
        self.conv_out = nn.Conv2d(rev[-1], cfg.in_channels, 3, padding=1)

    def forward(self, h: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        h = self.mid_block(self.conv_in(h), zq)  # (B, ch[-1], h, w)
        for level in self.up_blocks:
            h = level(h, zq)
        return self.conv_out(F.silu(self.conv_norm_out(h, zq)))  # (B, 3, H, W)


# ---- the model ---------------------------------------------------------------------------------------------------


class MoVQ(nn.Module):
    """Images in [-1, 1] <-> indices [B, h, w, c] (int64) over one shared codebook of K codes."""

    def __init__(self, config: MoVQConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.latent_channels, 1)
        self.quantizer = MultichannelQuantizer(config.codebook_size, config.code_dim, config.num_chunks,
                                               config.beta)
        # F0: "conv" is taming's / diffusers' post_quant_conv (its keys: old checkpoints and diffusers weights map).
        conv_f0 = config.f0 == "conv"
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.z_channels, 1) if conv_f0 else None
        self.initial_feature = None if conv_f0 else make_initial_feature(config)
        self.decoder = Decoder(config)

    def _check_images(self, x: torch.Tensor) -> None:
        cfg = self.config
        if x.dim() != 4 or tuple(x.shape[1:]) != (cfg.in_channels, cfg.image_size, cfg.image_size):
            raise ValueError(f"expected images [B,{cfg.in_channels},{cfg.image_size},{cfg.image_size}], "
                             f"got {list(x.shape)}")

    def encode_z(self, x: torch.Tensor) -> torch.Tensor:
        """Continuous latents z (B, n_z, h, w) before quantization."""
        self._check_images(x)
        return self.quant_conv(self.encoder(x))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x float (B, 3, H, W) in [-1, 1] -> indices int64 (B, h, w, c)."""
        return self.quantizer.nearest(self.encode_z(x))

    def decode_quantized(self, zq: torch.Tensor) -> torch.Tensor:
        """z_q (B, n_z, h, w) -> images (B, 3, H, W): F0(z_q) enters the decoder, z_q also modulates its norms."""
        f0 = self.post_quant_conv(zq) if self.post_quant_conv is not None else self.initial_feature(zq)
        return self.decoder(f0, zq)  # F0: (B, z_channels, h, w)

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (B, h, w, c), int32 or int64 -> images float (B, 3, H, W), unclamped (~[-1, 1])."""
        if indices.dim() != 4 or tuple(indices.shape[1:]) != self.config.grid:
            raise ValueError(f"expected indices [B,{','.join(map(str, self.config.grid))}], got {list(indices.shape)}")
        return self.decode_quantized(self.quantizer.lookup(indices))

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def forward(self, x: torch.Tensor):
        """-> (x_rec, quant_loss, info); info: indices, perplexity, code_counts (K,), usage, codebook_loss,
        commitment_loss."""
        zq, quant_loss, info = self.quantizer(self.encode_z(x))
        return self.decode_quantized(zq), quant_loss, info

    @property
    def last_layer_weight(self) -> torch.Tensor:
        """The decoder's final conv weight (VQGAN's adaptive GAN weight differentiates through it)."""
        return self.decoder.conv_out.weight

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ---- diffusers -----------------------------------------------------------------------------------------------
    @staticmethod
    def config_from_diffusers(vq_model, image_size: int | None = None) -> MoVQConfig:
        """The MoVQConfig equivalent to a diffusers `VQModel`'s config (ValueError if it has no equivalent)."""
        dc = vq_model.config
        down, up = tuple(dc.down_block_types), tuple(dc.up_block_types)
        allowed_down = {"DownEncoderBlock2D": False, "AttnDownEncoderBlock2D": True}
        allowed_up = {"UpDecoderBlock2D": False, "AttnUpDecoderBlock2D": True}
        if any(t not in allowed_down for t in down) or any(t not in allowed_up for t in up):
            raise ValueError(f"unsupported diffusers block types {down} / {up}")
        attn_down = [allowed_down[t] for t in down]
        if [allowed_up[t] for t in reversed(up)] != attn_down:
            raise ValueError(f"decoder attention {up} does not mirror the encoder's {down}")
        if dc.act_fn not in ("silu", "swish"):
            raise ValueError(f"unsupported act_fn {dc.act_fn!r}; only silu")
        if dc.in_channels != dc.out_channels:
            raise ValueError("in_channels and out_channels of the diffusers model differ")
        if dc.norm_type not in ("group", "spatial"):
            raise ValueError(f"unsupported norm_type {dc.norm_type!r}")
        vq_dim = dc.vq_embed_dim if dc.vq_embed_dim is not None else dc.latent_channels
        if dc.norm_type == "spatial" and (dc.norm_num_groups != 32 or vq_dim != dc.latent_channels):
            raise ValueError("a spatial-norm VQModel needs norm_num_groups == 32 and vq_embed_dim == latent_channels")
        return MoVQConfig(
            image_size=image_size if image_size is not None else dc.sample_size, in_channels=dc.in_channels,
            block_out_channels=tuple(dc.block_out_channels), layers_per_block=dc.layers_per_block,
            attention_levels=tuple(i for i, a in enumerate(attn_down) if a),
            mid_attention=getattr(dc, "mid_block_add_attention", True), norm_groups=dc.norm_num_groups,
            latent_channels=vq_dim, pre_quant_channels=dc.latent_channels if dc.latent_channels != vq_dim else None,
            num_chunks=1, codebook_size=dc.num_vq_embeddings,
            modulation="all" if dc.norm_type == "spatial" else "none")

    @classmethod
    def from_diffusers(cls, vq_model, image_size: int | None = None) -> "MoVQ":
        """Our model with the weights of a diffusers `VQModel` (norm_type "group" or "spatial"; c = 1).

        `image_size` defaults to the diffusers config's sample_size (only used for input checks and grid sizes).
        """
        model = cls(cls.config_from_diffusers(vq_model, image_size))
        renames = [(".downsamplers.0.", ".downsample."), (".upsamplers.0.", ".upsample."),
                   (".group_norm.", ".norm."), (".spatial_norm.", ".norm."), (".to_out.0.", ".to_out.")]
        state = {}
        for key, value in vq_model.state_dict().items():
            if key == "quantize.embedding.weight":
                key = "quantizer.codebook.weight"
            for old, new in renames:
                key = key.replace(old, new)
            state[key] = value
        ours = model.state_dict()
        missing, unexpected = set(ours) - set(state), set(state) - set(ours)
        if missing or unexpected:
            raise ValueError(f"diffusers weights do not map: missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(unexpected)[:5]}")
        model.load_state_dict(state)
        return model

