"""Small torch classifiers used to build backdoored example models.

Every builder takes ``num_classes``, ``in_channels`` and ``image_size`` so the same
architecture serves Fashion-MNIST (1x28x28) and CIFAR-10 (3x32x32). The models take
float32 input in [0, 1] and only use layers that export to plain ONNX operators
(Conv, BatchNormalization, Relu, Add, MaxPool, GlobalAveragePool, Flatten, Gemm).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

ImageSize = int | tuple[int, int]  # side of a square image, or (height, width)


def _conv_bn(cin: int, cout: int, stride: int = 1, groups: int = 1, kernel: int = 3) -> list[nn.Module]:
    """Conv (no bias: BatchNorm supplies it) followed by BatchNorm."""
    return [
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv-BN layers with an identity or 1x1 shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(cin, cout, stride)
        self.conv2, self.bn2 = _conv_bn(cout, cout)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(*_conv_bn(cin, cout, stride, kernel=1))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """Three-stage ResNet (widths 16/32/64, one BasicBlock per stage)."""

    def __init__(self, num_classes: int, in_channels: int, widths: tuple[int, ...] = (16, 32, 64)) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(in_channels, widths[0]), nn.ReLU())
        blocks, cin = [], widths[0]
        for i, width in enumerate(widths):
            blocks.append(BasicBlock(cin, width, stride=1 if i == 0 else 2))
            cin = width
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.layers(self.stem(x)))
        return self.fc(x.flatten(1))


class PreActBlock(nn.Module):
    """Pre-activation basic block (He et al. 2016): BN-ReLU-conv twice."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(self.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet18(nn.Module):
    """PreAct-ResNet-18, the usual CIFAR-10 model in the ANP paper's experiments."""

    def __init__(self, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, padding=1, bias=False)
        blocks, cin = [], 64
        for i, width in enumerate((64, 128, 256, 512)):
            for j in range(2):
                blocks.append(PreActBlock(cin, width, stride=2 if i > 0 and j == 0 else 1))
                cin = width
        self.layers = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn(self.layers(self.conv1(x))))
        return self.fc(self.pool(x).flatten(1))


class VGGSmall(nn.Module):
    """VGG-style network: stages of conv-BN-ReLU layers separated by 2x2 max-pooling."""

    def __init__(self, num_classes: int, in_channels: int, stages: tuple[tuple[int, ...], ...]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for stage in stages:
            for width in stage:
                layers += [*_conv_bn(cin, width), nn.ReLU()]
                cin = width
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(cin, 128), nn.ReLU(), nn.Linear(128, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


class DepthwiseSeparable(nn.Module):
    """MobileNet block: 3x3 depthwise conv-BN-ReLU then 1x1 pointwise conv-BN-ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *_conv_bn(cin, cin, stride, groups=cin),
            nn.ReLU(),
            *_conv_bn(cin, cout, kernel=1),
            nn.ReLU(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class MobileNetSmall(nn.Module):
    """MobileNet-v1-style stack of depthwise-separable blocks."""

    def __init__(self, num_classes: int, in_channels: int) -> None:
        super().__init__()
        plan = ((32, 1), (64, 2), (64, 1), (128, 2), (128, 1))
        layers: list[nn.Module] = [*_conv_bn(in_channels, 16), nn.ReLU()]
        cin = 16
        for width, stride in plan:
            layers.append(DepthwiseSeparable(cin, width, stride))
            cin = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


class FlattenCNN(nn.Module):
    """Stride-2 conv-BN-ReLU stages, then Flatten and one Linear layer over the whole feature map.

    Global average pooling (the other builders) forgets where in the image a feature was; flattening
    keeps it, which a side-by-side pair of images (tools/pair_labels.py: left class, right class) needs.
    """

    def __init__(
        self, num_classes: int, in_channels: int, height: int, width: int, widths: tuple[int, ...] = (16, 32, 64, 64)
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for i, cout in enumerate(widths):
            layers += [*_conv_bn(cin, cout, stride=1 if i == 0 else 2), nn.ReLU()]
            cin = cout
            if i > 0:
                height, width = (height + 1) // 2, (width + 1) // 2
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(cin * height * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x).flatten(1))


def small_resnet(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> nn.Module:
    """ResNet with three BasicBlocks (16/32/64 channels), ~75k parameters."""
    return SmallResNet(num_classes, in_channels)


def vgg_small(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> nn.Module:
    """VGG-style conv-BN-ReLU stacks (32-32 / 64-64 / 128), ~0.3M parameters."""
    return VGGSmall(num_classes, in_channels, stages=((32, 32), (64, 64), (128,)))


def mobilenet_small(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> nn.Module:
    """Depthwise-separable blocks with BatchNorm, ~40k parameters."""
    return MobileNetSmall(num_classes, in_channels)


def mlp(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> nn.Module:
    """Two hidden layers (256, 128); the input image is flattened inside the model."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_channels * image_size * image_size, 256),
        nn.ReLU(),
        nn.Linear(256, 128),
        nn.ReLU(),
        nn.Linear(128, num_classes),
    )


def preact_resnet18(num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """PreAct-ResNet-18 (11M parameters); meant for CIFAR-10 on a GPU."""
    return PreActResNet18(num_classes, in_channels)


def flatten_cnn(num_classes: int = 10, in_channels: int = 1, image_size: ImageSize = 28) -> nn.Module:
    """Four conv-BN-ReLU stages (16/32/64/64 channels, the last three of stride 2) and a Linear layer on the
    flattened map; takes non-square images (``image_size=(28, 56)``: a 4x7 map, ~0.24M parameters with 100
    classes, ~71k at 28x28 with 10)."""
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    return FlattenCNN(num_classes, in_channels, height, width)


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "small_resnet": small_resnet,
    "vgg_small": vgg_small,
    "mobilenet_small": mobilenet_small,
    "mlp": mlp,
    "preact_resnet18": preact_resnet18,
    "flatten_cnn": flatten_cnn,
}


def build(name: str, num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> nn.Module:
    """Construct the architecture called ``name``."""
    try:
        factory = ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; choose from {sorted(ARCHITECTURES)}") from None
    return factory(num_classes=num_classes, in_channels=in_channels, image_size=image_size)
