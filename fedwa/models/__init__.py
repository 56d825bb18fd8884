"""Model zoo: a small MLP, a small BatchNorm CNN and CIFAR-style ResNet-20/32, or the user's own.

``model = "module:function"`` names the user's factory instead (see :data:`FACTORY_CONTRACT`
and :func:`build_model`).

Every model names its final linear layer ``classifier`` and keeps a plain layer-by-layer
structure (named submodules, no weight tying, no in-place activations), because later code
reads the classifier on its own and aligns hidden units across models layer by layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedwa.common.errors import ConfigError
from fedwa.common.plugins import (accepts, has_parameter, is_import_path, load_callable,
                                  signature_text)

MODEL_NAMES = ("mlp", "cnn", "resnet20", "resnet32")

#: What a user's model factory (``model = "module:function"``) must be; quoted in errors.
FACTORY_CONTRACT = ("an import path module:function naming a factory "
                    "make_net(input_shape, num_classes) that returns a torch.nn.Module")

# Where build_model leaves a user model's origin (see ModelOrigin); read by fedwa.core.alignment.
ORIGIN_ATTR = "_fedwa_origin"


@dataclass(frozen=True)
class ModelOrigin:
    """How a user's model was built: what the permutation-spec lookup needs to know.

    Attributes
    ----------
    name : str
        The ``model`` value, ``"module:function"``.
    input_shape : tuple of int
        ``(C, H, W)`` the factory was called with (automatic spec derivation traces the model
        on an input of this shape).
    num_classes : int
        Number of outputs asked for.
    spec_fn : callable or None
        The user's ``permutation_spec(model) -> PermutationSpec`` found beside the factory:
        the factory's own ``permutation_spec`` attribute, else a module-level function
        ``permutation_spec`` (see :func:`fedwa.core.alignment.permutation_spec`).
    """

    name: str
    input_shape: tuple[int, int, int]
    num_classes: int
    spec_fn: Callable[[nn.Module], Any] | None = None


def model_origin(model: nn.Module) -> ModelOrigin | None:
    """The :class:`ModelOrigin` of a model built from a user's factory, else ``None``."""
    origin = getattr(model, ORIGIN_ATTR, None)
    return origin if isinstance(origin, ModelOrigin) else None


#: Set on fedwa's own lookup (:func:`fedwa.core.alignment.permutation_spec`), so it is told apart
#: from a user's spec without this module importing the alignment code.
FEDWA_LOOKUP_ATTR = "_fedwa_spec_lookup"


def _user_spec_fn(factory: Any, module: Any) -> Callable[[nn.Module], Any] | None:
    for candidate in (getattr(factory, "permutation_spec", None),
                      getattr(module, "permutation_spec", None)):
        # `from fedwa.core.alignment import permutation_spec` in the user's module is fedwa's own
        # lookup, not a spec of theirs: calling it from the lookup would recurse.
        if callable(candidate) and not getattr(candidate, FEDWA_LOOKUP_ATTR, False):
            return candidate
    return None


def _build_user_model(name: str, input_shape: tuple[int, int, int], num_classes: int,
                      width: int) -> nn.Module:
    factory, module = load_callable("model", name, FACTORY_CONTRACT)
    kwargs = {"width": width} if has_parameter(factory, "width") else {}
    if width != 1 and not kwargs:
        raise ConfigError("model-width", width, f"1 with model = {name!r}: "
                          f"{signature_text(factory)} takes no width parameter")
    if not accepts(factory, input_shape, num_classes, **kwargs):
        raise ConfigError("model", name, f"{FACTORY_CONTRACT}; {signature_text(factory)} "
                          "cannot be called as make_net(input_shape, num_classes)")
    model = factory(input_shape, num_classes, **kwargs)
    if not isinstance(model, nn.Module):
        raise ConfigError("model", name, f"{FACTORY_CONTRACT}; it returned a "
                          f"{type(model).__name__}")
    if not any(p.is_floating_point() for p in model.parameters()):
        raise ConfigError("model", name, f"{FACTORY_CONTRACT}; {type(model).__name__} has no "
                          "floating-point parameters to train")
    # A plain attribute (not a submodule or buffer): it stays out of the state dict that
    # travels, and moves with the model through deepcopy.
    object.__setattr__(model, ORIGIN_ATTR, ModelOrigin(name, tuple(input_shape), num_classes,
                                                       _user_spec_fn(factory, module)))
    return model


class MLP(nn.Module):
    """Flatten -> Linear -> ReLU -> Linear -> ReLU -> classifier, ``hidden`` units per layer."""

    def __init__(self, in_features: int, hidden: int, num_classes: int) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(in_features, hidden)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(hidden, hidden)
        self.relu2 = nn.ReLU()
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.fc1(self.flatten(x)))
        x = self.relu2(self.fc2(x))
        return self.classifier(x)


class SmallCNN(nn.Module):
    """Two conv3x3-BN-ReLU-MaxPool2 stages, a hidden linear layer and the classifier.

    The convolutions have no bias since the BatchNorm right after them would cancel it.
    """

    def __init__(
        self, in_channels: int, height: int, width: int, num_classes: int, w: int = 1
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16 * w, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16 * w)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(16 * w, 32 * w, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32 * w)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        # Two floor-halvings equal one floor-quartering, so this matches any H, W >= 4.
        self.fc1 = nn.Linear(32 * w * (height // 4) * (width // 4), 64 * w)
        self.relu3 = nn.ReLU()
        self.classifier = nn.Linear(64 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.bn1(self.conv1(x))))
        x = self.pool2(self.relu2(self.bn2(self.conv2(x))))
        x = self.relu3(self.fc1(self.flatten(x)))
        return self.classifier(x)


class BasicBlock(nn.Module):
    """Two conv3x3-BN layers with a shortcut; ReLU after the sum (He et al. 2016).

    When the shape changes the shortcut is a 1x1 conv + BN ("option B") rather than the
    paper's zero-padded identity ("option A"): with zero padding, some output channels are
    fixed copies of input channels, so the block's units could not be permuted freely, which
    the cross-model alignment code relies on. A learned projection keeps every unit permutable.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet-(6n+2) (He et al. 2016, arXiv 1512.03385, section 4.2).

    Stem conv3x3-BN-ReLU, three stages of ``n`` BasicBlocks with 16w/32w/64w channels
    (stride 2 at the first block of stages 2 and 3), global average pooling, classifier.
    Global average pooling makes the classifier independent of the input size (8x8 digits
    end at 2x2, 32x32 images at 8x8).
    """

    def __init__(self, in_channels: int, n: int, num_classes: int, w: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16 * w, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16 * w)
        self.relu = nn.ReLU()
        self.layer1 = self._stage(16 * w, 16 * w, n, stride=1)
        self.layer2 = self._stage(16 * w, 32 * w, n, stride=2)
        self.layer3 = self._stage(32 * w, 64 * w, n, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(64 * w, num_classes)

    @staticmethod
    def _stage(in_planes: int, planes: int, n: int, stride: int) -> nn.Sequential:
        blocks = [BasicBlock(in_planes, planes, stride)]
        blocks += [BasicBlock(planes, planes) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.classifier(self.flatten(self.pool(x)))


def build_model(
    name: str,
    input_shape: tuple[int, int, int],
    num_classes: int,
    seed: int = 0,
    width: int = 1,
) -> nn.Module:
    """Build a freshly initialised model, deterministically from ``seed``.

    Parameters
    ----------
    name : str
        One of :data:`MODEL_NAMES`, or ``"module:function"``: the user's factory, called as
        ``function(input_shape, num_classes)`` (plus ``width=`` when it takes a ``width``
        parameter) under the same seeding, and returning a ``torch.nn.Module``. Name its last
        linear layer ``classifier`` if late-phase heads should find it.
    input_shape : tuple of int
        ``(channels, height, width)`` of one example.
    num_classes : int
        Number of output logits.
    seed : int, optional
        Seed of the initialisation; the same seed gives a bitwise identical ``state_dict``.
        The caller's global torch RNG state is left untouched.
    width : int, optional
        Multiplier of every hidden layer's width.

    Returns
    -------
    torch.nn.Module
        The model (on CPU, in training mode); its last linear layer is ``model.classifier``.

    Raises
    ------
    ConfigError
        If ``name`` is not a known model, or a user factory cannot be imported or called as
        ``make_net(input_shape, num_classes)`` or returns no ``nn.Module`` (key ``model``).
    ValueError
        If ``input_shape``, ``num_classes`` or ``width`` is malformed.
    """
    if name not in MODEL_NAMES and not is_import_path(name):
        raise ConfigError("model", name, "one of " + ", ".join(MODEL_NAMES) + ", or " +
                          FACTORY_CONTRACT)
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise ValueError(f"input_shape must be (channels, height, width), got {input_shape!r}")
    if num_classes < 1 or width < 1:
        raise ValueError(f"num_classes and width must be >= 1, got {num_classes} and {width}")
    c, h, w = input_shape
    if name == "cnn" and min(h, w) < 4:
        raise ValueError(f"cnn needs inputs of at least 4x4 (two 2x2 max-pools), got {h}x{w}")
    # fork_rng restores the CPU RNG on exit, so seeding here cannot shift the caller's
    # random stream (e.g. data shuffling) depending on whether a model was built.
    with torch.random.fork_rng(devices=[]):
        # Only the CPU generator: torch.manual_seed would also queue a seed for every
        # accelerator backend, formatting a stack trace each time (a third of building a
        # small model), although init runs on the CPU.
        torch.default_generator.manual_seed(seed)
        if is_import_path(name):
            return _build_user_model(name, (c, h, w), num_classes, width)
        if name == "mlp":
            return MLP(c * h * w, 128 * width, num_classes)
        if name == "cnn":
            return SmallCNN(c, h, w, num_classes, width)
        return ResNet(c, 3 if name == "resnet20" else 5, num_classes, width)


def num_parameters(model: nn.Module) -> int:
    """Count the learnable (``requires_grad``) parameters of ``model``.

    Parameters
    ----------
    model : torch.nn.Module
        Any module.

    Returns
    -------
    int
        Total number of scalar learnable parameters; buffers such as BN statistics excluded.
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
