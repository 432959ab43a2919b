"""A pure-PyTorch reference of VideoLLaMA2's ``STCConnector`` with timm's RegStage semantics.

timm cannot be installed beside this torch build, so this file re-creates the modules that
``videollama2/model/projector.py`` builds (timm v1.0.3, the version VideoLLaMA2 pins) with
the same attribute names, hence the same ``state_dict`` keys as a real ``mm_projector.bin``:

    s{1,2}.b{i}.conv{1,2,3}.conv.weight        Conv2d, bias=False
    s{1,2}.b{i}.conv{1,2,3}.bn.{weight,bias}    LayerNormAct2d (eps 1e-5)
    s{1,2}.b{i}.se.fc{1,2}.{weight,bias}        SEModule 1×1 convs
    s1.b1.downsample.{conv.weight,bn.*}         shortcut, only where channels change
    sampler.0.{weight,bias}                     Conv3d
    readout.{0,2,...}.{weight,bias}             Linear (GELU at the odd indices)

What timm does for ``RegStage(depth, in_chs, out_chs, stride=1, dilation=1,
act_layer=nn.SiLU, norm_layer=LayerNorm2d)``: every block is a ``Bottleneck`` with its
defaults ``bottle_ratio=1``, ``group_size=1`` (groups = bottleneck channels: depthwise 3×3),
``se_ratio=0.25`` with ``rd_channels = int(round(in_chs * 0.25))`` of the block's *input*
channels and the SE activation = ``act_layer``; ``ConvNormAct`` maps ``LayerNorm2d`` to
``LayerNormAct2d`` (eps 1e-5); the shortcut is ``ConvNormAct(1×1, apply_act=False)`` when
``in_chs != out_chs`` else identity; SiLU is applied after the residual add.
"""

from __future__ import annotations

import einops
import torch
import torch.nn.functional as F
from torch import nn


class LayerNormAct2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor, then an optional SiLU."""

    def __init__(self, num_channels: int, eps: float = 1e-5, apply_act: bool = True):
        super().__init__(num_channels, eps=eps)
        self.act = nn.SiLU() if apply_act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return self.act(x.permute(0, 3, 1, 2))


class ConvNormAct(nn.Module):
    """Bias-free conv (``conv``) with 'same' padding for stride 1, then norm + act (``bn``)."""

    def __init__(self, in_chs, out_chs, kernel_size, groups=1, apply_act=True):
        super().__init__()
        self.conv = nn.Conv2d(
            in_chs, out_chs, kernel_size, padding=(kernel_size - 1) // 2, groups=groups, bias=False
        )
        self.bn = LayerNormAct2d(out_chs, apply_act=apply_act)

    def forward(self, x):
        return self.bn(self.conv(x))


class SqueezeExcite(nn.Module):
    """timm ``SEModule`` with ``rd_channels`` given and a SiLU inner activation."""

    def __init__(self, channels: int, rd_channels: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, rd_channels, kernel_size=1, bias=True)
        self.bn = nn.Identity()
        self.act = nn.SiLU()
        self.fc2 = nn.Conv2d(rd_channels, channels, kernel_size=1, bias=True)

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        s = self.fc2(self.act(self.bn(self.fc1(s))))
        return x * torch.sigmoid(s)


class Bottleneck(nn.Module):
    """timm RegNet ``Bottleneck`` (stride 1, dilation 1, downsample='conv1x1')."""

    def __init__(self, in_chs, out_chs, bottle_ratio=1.0, group_size=1, se_ratio=0.25):
        super().__init__()
        mid = int(round(out_chs * bottle_ratio))
        self.conv1 = ConvNormAct(in_chs, mid, 1)
        self.conv2 = ConvNormAct(mid, mid, 3, groups=mid // group_size)
        if se_ratio:
            self.se = SqueezeExcite(mid, int(round(in_chs * se_ratio)))
        else:
            self.se = nn.Identity()
        self.conv3 = ConvNormAct(mid, out_chs, 1, apply_act=False)
        self.act3 = nn.SiLU()
        if in_chs != out_chs:
            self.downsample = ConvNormAct(in_chs, out_chs, 1, apply_act=False)
        else:
            self.downsample = nn.Identity()

    def forward(self, x):
        shortcut = x
        x = self.conv3(self.se(self.conv2(self.conv1(x))))
        return self.act3(x + self.downsample(shortcut))


class RegStage(nn.Module):
    """``depth`` bottlenecks named ``b1 … b{depth}``; only the first changes channels."""

    def __init__(self, depth, in_chs, out_chs, **block_kwargs):
        super().__init__()
        for i in range(depth):
            block_in = in_chs if i == 0 else out_chs
            self.add_module(f"b{i + 1}", Bottleneck(block_in, out_chs, **block_kwargs))

    def forward(self, x):
        for block in self.children():
            x = block(x)
        return x


def build_mlp(depth: int, hidden_size: int, output_hidden_size: int) -> nn.Sequential:
    modules = [nn.Linear(hidden_size, output_hidden_size)]
    for _ in range(1, depth):
        modules.append(nn.GELU())
        modules.append(nn.Linear(output_hidden_size, output_hidden_size))
    return nn.Sequential(*modules)


class STCConnector(nn.Module):
    """VideoLLaMA2 ``STCConnector`` (``[b,t,l,d]`` / ``[b,t,h,w,d]`` -> ``[b, t'h'w', d]``)."""

    def __init__(
        self,
        mm_hidden_size: int,
        hidden_size: int,
        downsample=(2, 2, 2),
        depth: int = 4,
        mlp_depth: int = 2,
        **block_kwargs,
    ):
        super().__init__()
        self.s1 = RegStage(depth, mm_hidden_size, hidden_size, **block_kwargs)
        self.sampler = nn.Sequential(
            nn.Conv3d(
                hidden_size, hidden_size, kernel_size=downsample, stride=downsample, padding=1
            ),
            nn.SiLU(),
        )
        self.s2 = RegStage(depth, hidden_size, hidden_size, **block_kwargs)
        self.readout = build_mlp(mlp_depth, hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.size(1)
        if x.ndim == 4:
            hw = int(x.size(2) ** 0.5)
            x = einops.rearrange(x, "b t (h w) d -> b d t h w", h=hw, w=hw)
        else:
            x = einops.rearrange(x, "b t h w d -> b d t h w")
        x = einops.rearrange(x, "b d t h w -> (b t) d h w")
        x = self.s1(x)
        x = einops.rearrange(x, "(b t) d h w -> b d t h w", t=t)
        x = self.sampler(x)
        new_t = x.size(2)
        x = einops.rearrange(x, "b d t h w -> (b t) d h w")
        x = self.s2(x)
        x = einops.rearrange(x, "(b t) d h w -> b (t h w) d", t=new_t)
        return self.readout(x)
