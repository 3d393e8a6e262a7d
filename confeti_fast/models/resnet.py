"""ResNetV1c backbones (the OpenMMLab design DeepLabV2 / DAFormer use), output stride 8.

ResNetV1c = ResNet with a deep stem (three 3x3 convs instead of one 7x7) and the stride of
a bottleneck on its 3x3 conv ("pytorch" style). Stages 3 and 4 are dilated (2, 4) instead of
strided, with `contract_dilation`: the first block of a dilated stage uses half the dilation.

Module names follow the OpenMMLab checkpoint keys exactly (`stem.N.*`,
`layerX.Y.{conv,bn}Z.*`, `layerX.0.downsample.{0,1}.*`), so `open-mmlab://resnet101_v1c`
(and the 18/34/50 siblings) load without renaming; see `checkpoint.py`.
"""
import torch.nn as nn

# depth -> (block kind, blocks per stage)
ARCH_SETTINGS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}
STRIDES = (1, 2, 1, 1)
DILATIONS = (1, 1, 2, 4)
STEM_CHANNELS = 64
BASE_CHANNELS = 64


def _conv3x3(cin, cout, stride=1, dilation=1):
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


class BasicBlock(nn.Module):
    """mmseg BasicBlock: the stride and dilation sit on conv1; conv2 is a plain 3x3."""

    expansion = 1

    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride, dilation)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """mmseg Bottleneck, 'pytorch' style: 1x1 -> 3x3 (stride, dilation) -> 1x1 (x4)."""

    expansion = 4

    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _make_layer(block, inplanes, planes, num_blocks, stride, dilation):
    downsample = None
    if stride != 1 or inplanes != planes * block.expansion:
        downsample = nn.Sequential(
            nn.Conv2d(inplanes, planes * block.expansion, 1, stride=stride, bias=False),
            nn.BatchNorm2d(planes * block.expansion),
        )
    first_dilation = dilation // 2 if dilation > 1 else dilation  # contract_dilation
    layers = [block(inplanes, planes, stride, first_dilation, downsample)]
    for _ in range(1, num_blocks):
        layers.append(block(planes * block.expansion, planes, 1, dilation))
    return nn.Sequential(*layers)


class ResNetV1c(nn.Module):
    """OpenMMLab ResNetV1c of depth 18, 34, 50 or 101 with output stride 8.

    `forward(x)` returns the four stage outputs [layer1, layer2, layer3, layer4] (strides
    4, 8, 8, 8). `out_channels` is the channel count of layer4 (512 or 2048) and
    `stage_channels` those of all four stages. BatchNorm is trainable (normal train/eval
    behaviour, nothing frozen).
    """

    def __init__(self, depth=101):
        super().__init__()
        if depth not in ARCH_SETTINGS:
            raise ValueError(f"ResNetV1c depth must be one of {sorted(ARCH_SETTINGS)}, got {depth!r}")
        kind, stage_blocks = ARCH_SETTINGS[depth]
        block = BasicBlock if kind == "basic" else Bottleneck
        self.depth = depth
        self.block = block
        self.stage_blocks = stage_blocks
        half = STEM_CHANNELS // 2
        self.stem = nn.Sequential(
            nn.Conv2d(3, half, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(half),
            nn.ReLU(inplace=True),
            nn.Conv2d(half, half, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(half),
            nn.ReLU(inplace=True),
            nn.Conv2d(half, STEM_CHANNELS, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(STEM_CHANNELS),
            nn.ReLU(inplace=True),
        )
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = STEM_CHANNELS
        self.stage_channels = []
        for i, num_blocks in enumerate(stage_blocks):
            planes = BASE_CHANNELS * 2 ** i
            layer = _make_layer(block, inplanes, planes, num_blocks, STRIDES[i], DILATIONS[i])
            self.add_module(f"layer{i + 1}", layer)
            inplanes = planes * block.expansion
            self.stage_channels.append(inplanes)
        self.out_channels = inplanes
        self.init_weights()

    def init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.maxpool(self.stem(x))
        outs = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            outs.append(x)
        return outs
