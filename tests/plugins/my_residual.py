# my_residual.py
from torch import nn

from fedwa.core.alignment import SpecBuilder


class ResidualNet(nn.Module):
    def __init__(self, channels, num_classes):
        super().__init__()
        self.stem = nn.Conv2d(channels, 16, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(16)
        self.conv = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.relu(self.bn0(self.stem(x)))
        x = self.relu(x + self.bn1(self.conv(x)))  # the residual sum
        return self.classifier(self.pool(x).flatten(1))


def make_net(input_shape, num_classes):
    return ResidualNet(input_shape[0], num_classes)


def permutation_spec(model):
    """The sum ties the stem's output channels to the block's: one group holds both."""
    b = SpecBuilder(model)
    b.group("stream", 16)
    for layer in ("stem", "bn0", "conv", "bn1"):
        b.produces("stream", layer)  # layers whose outputs are the group's units
    b.consumes("stream", "conv")  # layers that read them (input axis)
    b.consumes("stream", "classifier")
    b.probe("stream", "bn0")  # where the units' activations are measured
    b.fix("stem.weight", 1)  # input channels: never permuted
    b.fix("classifier.weight", 0)  # classes: never permuted
    b.fix("classifier.bias", 0)
    return b.build()
