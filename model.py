"""The denoising networks: a small residual convolutional U-Net (the default) and, to compare against,
a residual MLP over the flattened image. Both take a timestep embedding and an optional digit label.

They map a noisy image and its timestep to a prediction (of the noise, by default); they know nothing
about the noise schedule (that lives in diffusion.py).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class UNetConfig:
    # Narrow at 28x28 and wide at 7x7: a 3x3 conv costs 16x more per parameter at 28x28 than at
    # 7x7, so most of the ~2.3M parameters sit where they are cheap.
    channels: tuple = (16, 64, 256)  # width at 28x28, 14x14 and 7x7
    blocks: tuple = (1, 1, 2)        # residual blocks per level, on the way down and again on the way up
    groups: int = 8                  # GroupNorm groups
    num_classes: int = 0             # 0: unconditional; 10: digit labels 0-9, and 10 means "no label"
    attention: bool = False          # one self-attention block over the 7x7 positions, between down and up
    up_conv: str = "low"             # where each upsampling's 3x3 conv runs: before the 2x nearest resize, at the
                                     # lower resolution ("low": 4x fewer FLOPs; the default since 2026-11-28), or
                                     # after it ("high", the original)
    scale_shift: bool = False        # the embedding scales and shifts each block's second GroupNorm (ADM's AdaGN)
                                     # rather than being added before it
    label_silu: bool = False         # the label joins the timestep embedding before its last SiLU (as in ADM and
                                     # diffusers), so what each block takes from it can change with t; after the
                                     # SiLU (the original) each block gets a fixed offset per label
    emb_dim: int = 0                 # width of the timestep and label embedding, from emb_dim / 4 sinusoidal
                                     # features; 0: 4 x channels[0] (ADM's rule: 64 from 16 features by default)


UP_CONVS = ("high", "low")


def timestep_embedding(t, dim):
    """Sinusoidal embedding of integer timesteps, as in the Transformer and DDPM papers."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([args.sin(), args.cos()], dim=1)  # (B, dim)


def label_embedding(num_classes, dim):
    """One learned vector per label plus one for "no label", or None without labels. Zero at first, so
    labels start as a no-op rather than as noise swamping the timestep embedding."""
    if not num_classes:
        return None
    emb = nn.Embedding(num_classes + 1, dim)
    nn.init.zeros_(emb.weight)
    return emb


def fp32_head(head, h):
    """The output layer in fp32 even under bf16 autocast: bf16 keeps about 3 significant digits, coarser
    than the part of the posterior-mean target that depends on x0 at large t (about 1e-4 at t=999)."""
    with torch.autocast(h.device.type, enabled=False):
        return head(h.float())


def add_label(label_emb, temb, y):
    """temb + the embedding of labels y (B,); y=None means "no label" (the last entry)."""
    if label_emb is None:
        if y is not None:
            raise ValueError("this network was built without labels (num_classes=0)")
        return temb
    if y is None:
        y = torch.full((temb.shape[0],), label_emb.num_embeddings - 1, device=temb.device, dtype=torch.long)
    return temb + label_emb(y)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the timestep embedding between the two convs: added before the second
    GroupNorm, or (scale_shift) setting a scale and a shift of its output per channel, as ADM's AdaGN does."""

    def __init__(self, cin, cout, tdim, groups, scale_shift=False):
        super().__init__()
        self.scale_shift = scale_shift
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(tdim, 2 * cout if scale_shift else cout)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity: stable early training
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        emb = self.temb(temb)[:, :, None, None]
        if self.scale_shift:
            scale, shift = emb.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + emb)
        h = self.conv2(F.silu(h))
        return h + self.skip(x)


class SelfAttention(nn.Module):
    """Multi-head self-attention over the positions of a feature map, as a residual block that starts as the
    identity (zero output projection)."""

    def __init__(self, ch, groups, heads=4):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch)
        self.attn = nn.MultiheadAttention(ch, heads, batch_first=True)  # holds the projections' weights
        nn.init.zeros_(self.attn.out_proj.weight)
        nn.init.zeros_(self.attn.out_proj.bias)

    def forward(self, x):
        b, c, hgt, wid = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, H*W, C)
        # nn.MultiheadAttention's own forward, written out: over 7 x 7 positions the fused CPU kernel it calls takes
        # twice as long for the block's forward and backward in bf16. q, k, v: (B, heads, H*W, C / heads).
        a = self.attn
        qkv = F.linear(tokens, a.in_proj_weight, a.in_proj_bias).unflatten(-1, (3, a.num_heads, a.head_dim))
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        weights = (q @ k.transpose(-2, -1) * a.head_dim ** -0.5).softmax(dim=-1)  # (B, heads, H*W, H*W)
        out = F.linear((weights @ v).transpose(1, 2).flatten(2), a.out_proj.weight, a.out_proj.bias)
        return x + out.transpose(1, 2).reshape(b, c, hgt, wid)


class UNet(nn.Module):
    """eps = UNet(x, t, y): x (B, 1, 28, 28) in [-1, 1], t (B,) integer timesteps, y (B,) labels or None."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        c, g = cfg.channels, cfg.groups
        tdim = cfg.emb_dim or 4 * c[0]
        if tdim % 8:
            raise ValueError(f"emb_dim must be a multiple of 8 (emb_dim / 4 sinusoidal features), not {tdim}")
        self.time_mlp = nn.Sequential(nn.Linear(tdim // 4, tdim), nn.SiLU(), nn.Linear(tdim, tdim))  # then a SiLU
        self.label_emb = label_embedding(cfg.num_classes, tdim)
        self.stem = nn.Conv2d(1, c[0], 3, padding=1)

        # Down: blocks at each level, then a strided conv to the next (28 -> 14 -> 7).
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        for i, ch in enumerate(c):
            cin = c[i - 1] if i else c[0]
            self.down.append(nn.ModuleList(ResBlock(cin if j == 0 else ch, ch, tdim, g, cfg.scale_shift)
                                           for j in range(cfg.blocks[i])))
            if i < len(c) - 1:
                self.downsample.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))

        self.middle = SelfAttention(c[-1], g) if cfg.attention else nn.Identity()

        # Up: from the bottom, upsample, concatenate the skip of that level, then blocks. The upsampling is a 2x
        # nearest resize and a 3x3 conv to the level's width, in either order (up_conv): the conv from 256 to 64
        # channels at 14x14 costs as much as a 256-channel conv at 7x7, a seventh of the training step on a CPU.
        if cfg.up_conv not in UP_CONVS:
            raise ValueError(f"up_conv must be one of {UP_CONVS}, not {cfg.up_conv!r}")
        self.upsample, self.up = nn.ModuleList(), nn.ModuleList()
        for i in reversed(range(len(c) - 1)):
            resize, conv = nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c[i + 1], c[i], 3, padding=1)
            self.upsample.append(nn.Sequential(resize, conv) if cfg.up_conv == "high" else nn.Sequential(conv, resize))
            self.up.append(nn.ModuleList(ResBlock(2 * c[i] if j == 0 else c[i], c[i], tdim, g, cfg.scale_shift)
                                         for j in range(cfg.blocks[i])))

        self.out = nn.Sequential(nn.GroupNorm(g, c[0]), nn.SiLU(), nn.Conv2d(c[0], 1, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x, t, y=None):
        emb = timestep_embedding(t, self.time_mlp[0].in_features)
        if self.cfg.label_silu:  # the label before the embedding's last SiLU
            temb = F.silu(add_label(self.label_emb, self.time_mlp(emb), y))  # (B, tdim)
        else:
            temb = add_label(self.label_emb, F.silu(self.time_mlp(emb)), y)
        h = self.stem(x)  # (B, c0, 28, 28)
        skips = []
        for i, blocks in enumerate(self.down):
            for block in blocks:
                h = block(h, temb)
            if i < len(self.downsample):
                skips.append(h)
                h = self.downsample[i](h)
        h = self.middle(h)  # (B, c[-1], 7, 7)
        for upsample, blocks in zip(self.upsample, self.up):
            h = torch.cat([upsample(h), skips.pop()], dim=1)
            for block in blocks:
                h = block(h, temb)
        return fp32_head(self.out, h)  # (B, 1, 28, 28)


@dataclass
class MLPConfig:
    # 512 x 3 drew the best digits of the shapes screened at 20 minutes of a 2-core CPU (docs/variants.md):
    # FID 157 and 92% confident against 1024 x 3's 248 and 82%, from 3.4x the steps at 3.4x the images/s;
    # the 2048-wide ones saw too few images. 2.7M parameters, about 29x the U-Net's training images/s there.
    width: int = 512        # hidden units
    depth: int = 3          # residual blocks
    num_classes: int = 0    # as in UNetConfig


class MLPBlock(nn.Module):
    """LayerNorm-SiLU-Linear twice on h + the timestep embedding, on a residual path."""

    def __init__(self, width):
        super().__init__()
        self.norm1, self.fc1 = nn.LayerNorm(width), nn.Linear(width, width)
        self.norm2, self.fc2 = nn.LayerNorm(width), nn.Linear(width, width)
        nn.init.zeros_(self.fc2.weight)  # starts as the identity, as the U-Net's blocks do
        nn.init.zeros_(self.fc2.bias)

    def forward(self, h, temb):
        r = self.fc1(F.silu(self.norm1(h + temb)))
        return h + self.fc2(F.silu(self.norm2(r)))


class MLP(nn.Module):
    """out = MLP(x, t, y) over the flattened 28x28 image: no convolutions, no notion of neighbouring pixels.
    The timestep enters through the same sinusoidal embedding as the U-Net's."""

    def __init__(self, cfg: MLPConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.time_mlp = nn.Sequential(nn.Linear(128, w), nn.SiLU(), nn.Linear(w, w), nn.SiLU())
        self.label_emb = label_embedding(cfg.num_classes, w)
        self.inp = nn.Linear(28 * 28, w)
        self.blocks = nn.ModuleList(MLPBlock(w) for _ in range(cfg.depth))
        self.out = nn.Sequential(nn.LayerNorm(w), nn.SiLU(), nn.Linear(w, 28 * 28))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x, t, y=None):
        temb = add_label(self.label_emb, self.time_mlp(timestep_embedding(t, 128)), y)  # (B, width)
        h = self.inp(x.flatten(1))  # (B, width)
        for block in self.blocks:
            h = block(h, temb)
        return fp32_head(self.out, h).view_as(x)  # (B, 1, 28, 28)


@dataclass
class PointMLPConfig:
    # tiny-diffusion's network for 2D data: 128 wide, 3 blocks, each coordinate and t as sinusoidal features.
    width: int = 128
    depth: int = 3
    num_classes: int = 0    # the heart has no labels
    scale: float = 25.0     # coordinates in [-1, 1] times this before their sinusoidal features


class PointMLP(nn.Module):
    """out = PointMLP(x, t) for 2D points x (B, 2): each coordinate becomes sinusoidal features (so the network
    can draw a thin curve; raw coordinates give it only smooth functions to start from), joined with t's."""

    def __init__(self, cfg: PointMLPConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.time_mlp = nn.Sequential(nn.Linear(128, w), nn.SiLU())
        self.label_emb = label_embedding(cfg.num_classes, w)
        self.inp = nn.Linear(2 * 128, w)
        self.blocks = nn.ModuleList(MLPBlock(w) for _ in range(cfg.depth))
        self.out = nn.Sequential(nn.LayerNorm(w), nn.SiLU(), nn.Linear(w, 2))

    def forward(self, x, t, y=None):
        temb = add_label(self.label_emb, self.time_mlp(timestep_embedding(t, 128)), y)  # (B, width)
        features = [timestep_embedding(x[:, i] * self.cfg.scale, 128) for i in range(2)]  # 2 x (B, 128)
        h = self.inp(torch.cat(features, dim=1))  # (B, width)
        for block in self.blocks:
            h = block(h, temb)
        return fp32_head(self.out, h)  # (B, 2)


def build_network(config):
    """The network a checkpoint's model_config describes: {"arch": "unet" | "mlp" | "points", **its config}."""
    config = dict(config)
    arch = config.pop("arch", "unet")  # checkpoints from before the MLP hold a U-Net
    config = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
    if arch == "unet":
        before = {"up_conv": "high", "scale_shift": False, "label_silu": False, "emb_dim": 0}  # as before these keys
        return UNet(UNetConfig(**{**before, **config}))
    elif arch == "mlp":
        return MLP(MLPConfig(**config))
    elif arch == "points":
        return PointMLP(PointMLPConfig(**config))
    else:
        raise ValueError(f"unknown architecture {arch!r}; expected unet, mlp or points")


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())
