"""The U-Net: shapes, size, and that it listens to its timestep."""
import pytest
import torch
import torch.nn.functional as F

from ckpt import FORMAT, load_checkpoint, save_checkpoint
from model import ResBlock, SelfAttention, UNet, UNetConfig, build_network, count_parameters, timestep_embedding


def test_default_size_matches_the_design_card():
    n = count_parameters(UNet(UNetConfig()))
    assert 2_000_000 <= n <= 2_600_000


def test_output_shape_and_timestep_dependence():
    torch.manual_seed(0)
    model = UNet(UNetConfig(channels=(8, 16, 32), blocks=(1, 2, 1)))
    for p in model.parameters():  # undo the zero init, so every path contributes
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(5, 1, 28, 28)
    out = model(x, torch.full((5,), 3))
    assert out.shape == (5, 1, 28, 28)
    assert not torch.allclose(out, model(x, torch.full((5,), 700)))


def test_wider_channels_mean_more_parameters():
    small = count_parameters(UNet(UNetConfig(channels=(8, 16, 32))))
    assert count_parameters(UNet(UNetConfig(channels=(16, 32, 64)))) > 3 * small


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    cfg = UNetConfig(channels=(8, 16, 32), blocks=(1, 1, 1))
    model = UNet(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint({"format": FORMAT, "model_config": vars(cfg), "ema": model.state_dict()}, path)
    ckpt = load_checkpoint(path)
    rebuilt = build_network(ckpt["model_config"])
    rebuilt.load_state_dict(ckpt["ema"])
    x, t = torch.randn(3, 1, 28, 28), torch.tensor([0, 10, 999])
    assert torch.equal(model(x, t), rebuilt(x, t))
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_the_attention_block_starts_as_the_identity_and_then_learns():
    """With attention at 7x7 the U-Net computes what the same weights without it do, until the block's zeroed
    output projection is trained; old checkpoints (no attention key) build the plain network."""
    torch.manual_seed(0)
    plain = UNet(UNetConfig(channels=(8, 16, 32), num_classes=10))
    attn = UNet(UNetConfig(channels=(8, 16, 32), num_classes=10, attention=True))
    missing, unexpected = attn.load_state_dict(plain.state_dict(), strict=False)
    assert missing and all(k.startswith("middle.") for k in missing) and not unexpected
    for net in (plain, attn):  # non-zero last layers, so the output depends on everything before
        torch.nn.init.normal_(net.out[-1].weight)
    attn.out[-1].weight.data.copy_(plain.out[-1].weight)
    x, t, y = torch.randn(3, 1, 28, 28), torch.tensor([1, 400, 900]), torch.tensor([0, 5, 10])
    assert torch.allclose(plain(x, t, y), attn(x, t, y), atol=1e-6)
    torch.nn.init.normal_(attn.middle.attn.out_proj.weight)
    assert not torch.allclose(plain(x, t, y), attn(x, t, y), atol=1e-3)
    assert isinstance(build_network({"arch": "unet", "channels": [8, 16, 32]}).middle, torch.nn.Identity)


def test_the_upsampling_conv_runs_after_the_resize_or_before_it():
    """up_conv "high" (the original, and what checkpoints without the key build) resizes 2x and then convolves;
    "low" (the default) convolves at the lower resolution and then resizes: the same weights, a quarter of the FLOPs."""
    torch.manual_seed(0)
    high = UNet(UNetConfig(channels=(8, 16, 32), up_conv="high"))
    low = UNet(UNetConfig(channels=(8, 16, 32)))
    assert low.cfg.up_conv == "low"  # the default since 2026-11-28
    assert count_parameters(low) == count_parameters(high)
    h = torch.randn(2, 32, 7, 7)
    conv_high, conv_low = high.upsample[0][1], low.upsample[0][0]
    conv_low.load_state_dict(conv_high.state_dict())
    torch.testing.assert_close(high.upsample[0](h), conv_high(F.interpolate(h, scale_factor=2, mode="nearest")))
    torch.testing.assert_close(low.upsample[0](h), F.interpolate(conv_high(h), scale_factor=2, mode="nearest"))
    assert not torch.allclose(low.upsample[0](h), high.upsample[0](h), atol=1e-3)
    for p in low.parameters():  # undo the zero init, so every path contributes
        torch.nn.init.normal_(p, std=0.1)
    assert low(torch.randn(3, 1, 28, 28), torch.tensor([1, 400, 900])).shape == (3, 1, 28, 28)
    old = build_network({"arch": "unet", "channels": [8, 16, 32]})
    assert isinstance(old.upsample[0][0], torch.nn.Upsample) and old.cfg.up_conv == "high"
    with pytest.raises(ValueError, match="up_conv must be one of"):
        UNet(UNetConfig(channels=(8, 16, 32), up_conv="middle"))


def test_scale_shift_sets_a_scale_and_a_shift_of_the_second_norm_per_channel():
    """scale_shift: the block's embedding layer gives 2 x cout numbers, (1 + scale) multiplying and shift adding to
    the second GroupNorm's output; the default adds the embedding before that norm. Checkpoints without the key
    build the additive block."""
    torch.manual_seed(0)
    block = ResBlock(4, 8, 6, 2, scale_shift=True)
    assert block.temb.out_features == 16 and ResBlock(4, 8, 6, 2).temb.out_features == 8
    for p in block.parameters():  # undo the zero init, so the second conv passes on what the norm gives it
        torch.nn.init.normal_(p, std=0.3)
    x, temb = torch.randn(2, 4, 5, 5), torch.randn(2, 6)
    h = block.conv1(F.silu(block.norm1(x)))
    scale, shift = block.temb(temb).chunk(2, dim=1)
    expected = block.conv2(F.silu(block.norm2(h) * (1 + scale[:, :, None, None]) + shift[:, :, None, None]))
    torch.testing.assert_close(block(x, temb), expected + block.skip(x))
    with torch.no_grad():  # a shift of the same size on every channel would vanish in an additive block's norm
        block.temb.weight.zero_()
        block.temb.bias.copy_(torch.cat([torch.zeros(8), torch.full((8,), 2.0)]))
    additive = ResBlock(4, 8, 6, 2)
    additive.load_state_dict({k: v[8:] if k.startswith("temb.") else v for k, v in block.state_dict().items()})
    assert not torch.allclose(block(x, temb), additive(x, temb), atol=1e-3)
    net = UNet(UNetConfig(channels=(8, 16, 32), num_classes=10, scale_shift=True))
    assert count_parameters(net) > count_parameters(UNet(UNetConfig(channels=(8, 16, 32), num_classes=10)))
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(2, 1, 28, 28)
    out = net(x, torch.tensor([5, 5]), torch.tensor([3, 3]))
    assert out.shape == x.shape and not torch.allclose(out[0], net(x, torch.tensor([900, 5]), torch.tensor([3, 3]))[0])
    assert not build_network({"arch": "unet", "channels": [8, 16, 32]}).down[0][0].scale_shift


def test_label_silu_lets_the_labels_share_of_the_embedding_change_with_t():
    """The embedding the blocks get: by default SiLU(time_mlp(t)) plus the label's vector, so the label adds the same
    offset at every t; with label_silu SiLU(time_mlp(t) + the label's vector), and its share depends on t. Without
    labels the two are the same network; checkpoints without the key build the default."""
    torch.manual_seed(0)
    nets = [UNet(UNetConfig(channels=(8, 16, 32), num_classes=10, label_silu=s)) for s in (False, True)]
    nets[1].load_state_dict(nets[0].state_dict())  # the same weights: label_silu adds none
    torch.nn.init.normal_(nets[0].label_emb.weight)
    nets[1].label_emb.weight.data.copy_(nets[0].label_emb.weight)

    def embedding(net, t, y):  # what the first block's embedding layer is given (the hook returns None: no change)
        seen = []
        handle = net.down[0][0].temb.register_forward_hook(lambda m, args, out: seen.append(args[0]))
        net(torch.zeros(len(y), 1, 28, 28), torch.full((len(y),), t), torch.tensor(y))
        handle.remove()
        return seen[0]

    def label_share(net, t):  # the embedding with digit 3 less that with no label
        temb = embedding(net, t, [3, 10])
        return temb[0] - temb[1]

    default, silu = nets
    time = silu.time_mlp(timestep_embedding(torch.tensor([900]), 8))
    torch.testing.assert_close(embedding(silu, 900, [3]), F.silu(time + silu.label_emb.weight[3]))
    torch.testing.assert_close(embedding(default, 900, [3]), F.silu(time) + default.label_emb.weight[3])
    torch.testing.assert_close(label_share(default, 5), label_share(default, 900))
    torch.testing.assert_close(label_share(default, 5), default.label_emb.weight[3] - default.label_emb.weight[10])
    assert not torch.allclose(label_share(silu, 5), label_share(silu, 900), atol=1e-3)
    plain = [UNet(UNetConfig(channels=(8, 16, 32), label_silu=s)) for s in (False, True)]
    for p in plain[0].parameters():
        torch.nn.init.normal_(p, std=0.1)
    plain[1].load_state_dict(plain[0].state_dict())
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([5, 900])
    torch.testing.assert_close(plain[0](x, t), plain[1](x, t))
    assert not build_network({"arch": "unet", "channels": [8, 16, 32], "num_classes": 10}).cfg.label_silu


def test_emb_dim_widens_the_timestep_and_label_embedding():
    """emb_dim N: N/4 sinusoidal features, a time MLP N wide, a label vector of N and each block's embedding
    layer taking N; 0 (the default, and checkpoints without the key) keeps ADM's 4 x channels[0]."""
    torch.manual_seed(0)
    default = UNet(UNetConfig(channels=(8, 16, 32), num_classes=10))
    wide = UNet(UNetConfig(channels=(8, 16, 32), num_classes=10, emb_dim=64))
    assert (default.time_mlp[0].in_features, default.time_mlp[-1].out_features) == (8, 32)
    assert (wide.time_mlp[0].in_features, wide.time_mlp[-1].out_features) == (16, 64)
    assert wide.label_emb.weight.shape == (11, 64)
    assert all(block.temb.in_features == 64 for blocks in (*wide.down, *wide.up) for block in blocks)
    for p in wide.parameters():  # zero-initialised layers would hide the embedding's effect
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(2, 1, 28, 28)
    out = wide(x, torch.tensor([5, 5]), torch.tensor([3, 3]))
    assert out.shape == (2, 1, 28, 28)
    assert not torch.allclose(out, wide(x, torch.tensor([900, 900]), torch.tensor([3, 3])))
    assert not torch.allclose(out, wide(x, torch.tensor([5, 5]), torch.tensor([4, 4])))
    old = build_network({"arch": "unet", "channels": [8, 16, 32], "num_classes": 10})
    assert old.cfg.emb_dim == 0 and old.time_mlp[-1].out_features == 32
    assert sum(p.numel() for p in old.parameters()) == sum(p.numel() for p in default.parameters())
    with pytest.raises(ValueError, match="multiple of 8"):
        UNet(UNetConfig(channels=(8, 16, 32), emb_dim=60))


def test_the_written_out_attention_is_multihead_attention():
    """SelfAttention computes nn.MultiheadAttention's forward with that module's weights, only faster on a CPU."""
    torch.manual_seed(0)
    block = SelfAttention(32, 8)
    for p in block.attn.parameters():  # the biases too, which start at zero
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 32, 7, 7)
    tokens = block.norm(x).flatten(2).transpose(1, 2)
    attended = block.attn(tokens, tokens, tokens, need_weights=False)[0].transpose(1, 2).reshape(x.shape)
    assert torch.allclose(block(x), x + attended, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as it trains on a CPU with bf16: every product rounded
        low = block(x).float() - x
    assert (low - attended).abs().max() < 0.03 * attended.abs().max()  # 0.017 measured
