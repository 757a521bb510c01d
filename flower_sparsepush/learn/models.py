"""Models and flat-parameter helpers for push-sum training.

``build_model(name, ...)`` builds ``resnet20``, ``vgg11``, ``cnn``, ``mlp`` or ``logreg``.
Normalization layers are chosen with ``norm``: ``"group"`` (default, GroupNorm with 2
groups; batch-independent), ``"group:G"``, ``"layer"`` (GroupNorm with 1 group),
``"batch"`` (BatchNorm) or ``"none"``.

Push-sum only mixes *parameters*: :func:`flat_params`, :func:`load_flat_params_` and
:func:`segment_sizes` cover ``model.parameters()`` in order and never touch buffers, so
BatchNorm running statistics (buffers) stay local to each node.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "MODEL_NAMES",
    "build_model",
    "flat_params",
    "load_flat_params_",
    "make_norm",
    "num_params",
    "segment_sizes",
]

MODEL_NAMES: tuple[str, ...] = ("resnet20", "vgg11", "cnn", "mlp", "logreg")
NORM_HELP = "valid norms: 'group' (2 groups), 'group:G', 'layer', 'batch', 'none'"
DEFAULT_GROUPS = 2


def _parse_norm(norm: str) -> tuple[str, int]:
    s = str(norm).strip().lower()
    if s in ("batch", "bn"):
        return "batch", 0
    if s in ("group", "gn"):
        return "group", DEFAULT_GROUPS
    if s in ("layer", "ln"):
        return "group", 1
    if s in ("none", "identity"):
        return "none", 0
    if s.startswith("group:"):
        try:
            g = int(s.split(":", 1)[1])
        except ValueError:
            g = 0
        if g >= 1:
            return "group", g
    raise ValueError(f"unknown norm {norm!r}; {NORM_HELP}")


def make_norm(norm: str, channels: int) -> nn.Module:
    """A normalization layer over ``channels`` feature maps (GroupNorm groups must divide them)."""
    kind, groups = _parse_norm(norm)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "none":
        return nn.Identity()
    if channels % groups:
        raise ValueError(f"GroupNorm: {groups} groups do not divide {channels} channels")
    return nn.GroupNorm(groups, channels)


# --------------------------------------------------------------------------- ResNet-20


class _BasicBlock(nn.Module):
    """Two 3x3 convs with an option-A shortcut (strided identity + zero channel padding)."""

    def __init__(self, cin: int, cout: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.n1 = make_norm(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.n2 = make_norm(norm, cout)
        self.stride = stride
        self.extra = cout - cin

    def _shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.extra:
            half = self.extra // 2
            x = F.pad(x, (0, 0, 0, 0, half, self.extra - half))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.n1(self.conv1(x)))
        out = self.n2(self.conv2(out))
        return F.relu(out + self._shortcut(x))


class ResNetCifar(nn.Module):
    """He et al. (2016) CIFAR ResNet-(6n+2): 3 stages of 16/32/64 channels, n blocks each.

    Uses the parameter-free option-A shortcut of the paper's CIFAR experiments, so
    ResNet-20 (n=3) has 0.27M parameters.
    """

    def __init__(self, n: int = 3, num_classes: int = 10, in_channels: int = 3, norm: str = "group") -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.norm = make_norm(norm, 16)
        layers: list[nn.Module] = []
        cin = 16
        for stage, cout in enumerate((16, 32, 64)):
            for b in range(n):
                stride = 2 if (stage > 0 and b == 0) else 1
                layers.append(_BasicBlock(cin, cout, stride, norm))
                cin = cout
        self.blocks = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm(self.conv(x)))
        x = self.blocks(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


# --------------------------------------------------------------------------- VGG-11

_VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512)


class VGG11(nn.Module):
    """VGG-11 conv stack (config A) with norm after each conv, adapted to 32x32 inputs.

    Four 2x2 max-pools take 32x32 to 2x2; a global average pool replaces the fifth pool
    (so 28x28 inputs work too), followed by a small classifier 512 -> 256 -> classes.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, norm: str = "group") -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for v in _VGG11:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [
                    nn.Conv2d(cin, int(v), 3, padding=1, bias=False),
                    make_norm(norm, int(v)),
                    nn.ReLU(inplace=True),
                ]
                cin = int(v)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Linear(512, 256), nn.ReLU(inplace=True), nn.Linear(256, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)
        return self.classifier(x)


# --------------------------------------------------------------------------- small models


class SmallCNN(nn.Module):
    """Two 5x5 conv layers (16, 32 channels, each norm + ReLU + 2x2 pool) and a 56-unit FC
    layer: about 102k parameters for 28x28 single-channel inputs (Fashion-MNIST)."""

    def __init__(
        self, num_classes: int = 10, in_channels: int = 1, norm: str = "group", input_size: int = 28, hidden: int = 56
    ) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, 5, padding=2, bias=False),
            make_norm(norm, 16),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 5, padding=2, bias=False),
            make_norm(norm, 32),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        side = input_size // 4
        self.fc1 = nn.Linear(32 * side * side, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x).flatten(1)
        return self.fc2(F.relu(self.fc1(x)))


class MLP(nn.Module):
    """Flatten, then fully connected layers with ReLU; ``hidden=()`` is logistic regression."""

    def __init__(self, input_dim: int, num_classes: int, hidden: Sequence[int] = (128,)) -> None:
        super().__init__()
        dims = [input_dim, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:], strict=True):
            layers += [nn.Linear(a, b), nn.ReLU(inplace=True)]
        layers.append(nn.Linear(dims[-1], num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def build_model(
    name: str,
    num_classes: int = 10,
    in_channels: int = 3,
    norm: str = "group",
    *,
    input_shape: Sequence[int] | None = None,
    hidden: Sequence[int] = (128,),
    seed: int | None = None,
) -> nn.Module:
    """Build a model by name: ``resnet20``, ``vgg11``, ``cnn``, ``mlp`` or ``logreg``.

    ``norm`` applies to the conv models (see module docstring). ``input_shape`` (one
    example's shape, e.g. ``(1, 28, 28)`` or ``(32,)``) is required for ``mlp``/``logreg``
    and sets the input side for ``cnn`` (default 28). ``seed`` makes initialization
    deterministic without touching the global RNG (all nodes can start identical).
    """
    key = str(name).strip().lower().replace("-", "")
    if key not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    _parse_norm(norm)  # validate early, even for models without norm layers
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        if key == "resnet20":
            model: nn.Module = ResNetCifar(3, num_classes, in_channels, norm)
        elif key == "vgg11":
            model = VGG11(num_classes, in_channels, norm)
        elif key == "cnn":
            side = int(input_shape[-1]) if input_shape is not None else 28
            model = SmallCNN(num_classes, in_channels, norm, side)
        else:
            if input_shape is None:
                raise ValueError(f"{key} needs input_shape (one example's shape, e.g. (1, 28, 28))")
            dim = int(math.prod(int(s) for s in input_shape))
            model = MLP(dim, num_classes, tuple(hidden) if key == "mlp" else ())
        if key != "mlp" and key != "logreg":
            _init_weights(model)
    return model


# --------------------------------------------------------------------------- flat params


def num_params(model: nn.Module) -> int:
    """Number of scalar parameters (buffers excluded)."""
    return sum(p.numel() for p in model.parameters())


def segment_sizes(model: nn.Module) -> list[int]:
    """Sizes of each parameter tensor in ``model.parameters()`` order (for per-tensor top-k)."""
    return [p.numel() for p in model.parameters()]


def flat_params(model: nn.Module) -> torch.Tensor:
    """All parameters concatenated into a new 1-D tensor (a copy; buffers excluded)."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@torch.no_grad()
def load_flat_params_(model: nn.Module, vec: torch.Tensor) -> nn.Module:
    """Copy a 1-D vector laid out as :func:`flat_params` back into the parameters, in place."""
    vec = vec.reshape(-1)
    total = num_params(model)
    if vec.numel() != total:
        raise ValueError(f"vector has {vec.numel()} elements, model has {total} parameters")
    off = 0
    for p in model.parameters():
        n = p.numel()
        p.copy_(vec[off : off + n].view_as(p))
        off += n
    return model
