import pytest
import torch
from torch import nn

from fedwa.common.errors import ConfigError
from fedwa.models import MODEL_NAMES, build_model, num_parameters


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32), (1, 28, 28)])
def test_forward_shape_and_classifier(name, shape):
    model = build_model(name, shape, num_classes=7)
    out = model(torch.randn(2, *shape))
    assert out.shape == (2, 7)
    assert isinstance(model.classifier, nn.Linear)
    assert model.classifier.out_features == 7


def test_mlp_param_count():
    # D = 1*28*28 = 784
    # fc1 784*128 + 128 = 100480; fc2 128*128 + 128 = 16512; classifier 128*10 + 10 = 1290
    # total 100480 + 16512 + 1290 = 118282
    assert num_parameters(build_model("mlp", (1, 28, 28), 10)) == 118282


def test_cnn_param_count():
    # conv1 1*16*9 = 144 (no bias); bn1 2*16 = 32
    # conv2 16*32*9 = 4608; bn2 2*32 = 64
    # fc1 32*7*7*64 + 64 = 100352 + 64 = 100416; classifier 64*10 + 10 = 650
    # total 144 + 32 + 4608 + 64 + 100416 + 650 = 105914
    assert num_parameters(build_model("cnn", (1, 28, 28), 10)) == 105914


def test_width_multiplies_hidden_units():
    assert build_model("mlp", (1, 8, 8), 10, width=2).fc1.out_features == 256
    assert build_model("cnn", (1, 8, 8), 10, width=2).classifier.in_features == 128
    assert build_model("resnet20", (1, 8, 8), 10, width=2).classifier.in_features == 128


def _convs(model):
    main = [m for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and "shortcut" not in n]
    proj = [m for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and "shortcut" in n]
    return main, proj


@pytest.mark.parametrize("name,n", [("resnet20", 3), ("resnet32", 5)])
def test_resnet_structure(name, n):
    model = build_model(name, (3, 32, 32), 10)
    main, proj = _convs(model)
    # stem + 3 stages * n blocks * 2 convs: 19 for resnet20, 31 for resnet32 (+ classifier
    # gives the 20/32 weighted layers); option B adds one 1x1 projection in stages 2 and 3.
    assert len(main) == 1 + 6 * n
    assert len(proj) == 2
    assert all(c.kernel_size == (1, 1) and c.stride == (2, 2) for c in proj)
    assert all(c.bias is None for c in main + proj)


def test_resnet20_param_count():
    # stem: conv 3*16*9 = 432, bn 32                                      -> 464
    # stage 1: 3 blocks * (2 * 16*16*9 + 2 * 32) = 3 * 4672              -> 14016
    # stage 2: first 16*32*9 + 32*32*9 + 2*64 + proj 16*32 + 64 = 14528,
    #          two more 2 * (2 * 32*32*9 + 2*64) = 2 * 18560              -> 51648
    # stage 3: first 32*64*9 + 64*64*9 + 2*128 + proj 32*64 + 128 = 57728,
    #          two more 2 * (2 * 64*64*9 + 2*128) = 2 * 73984             -> 205696
    # classifier 64*10 + 10                                               -> 650
    # total 272474 = the paper's option-A 269722 + projections (576 + 2176)
    assert num_parameters(build_model("resnet20", (3, 32, 32), 10)) == 272474


def test_resnet32_param_count():
    # as resnet20 with 5 blocks per stage:
    # 464 + 5*4672 + (14528 + 4*18560) + (57728 + 4*73984) + 650
    # = 464 + 23360 + 88768 + 353664 + 650 = 466906 (option A: 464154, + 2752)
    assert num_parameters(build_model("resnet32", (3, 32, 32), 10)) == 466906


def test_num_parameters_skips_frozen():
    model = build_model("mlp", (1, 28, 28), 10)
    model.classifier.requires_grad_(False)
    assert num_parameters(model) == 118282 - 1290


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_seed_determinism(name):
    a = build_model(name, (1, 8, 8), 10, seed=3).state_dict()
    b = build_model(name, (1, 8, 8), 10, seed=3).state_dict()
    c = build_model(name, (1, 8, 8), 10, seed=4).state_dict()
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_build_leaves_global_rng_untouched():
    torch.manual_seed(123)
    expected = torch.rand(5)
    torch.manual_seed(123)
    build_model("resnet20", (3, 32, 32), 10, seed=7)
    assert torch.equal(torch.rand(5), expected)
    # and the draw after a build continues the caller's stream, not the model seed's
    torch.manual_seed(123)
    torch.rand(5)
    after_plain = torch.rand(5)
    torch.manual_seed(123)
    torch.rand(5)
    build_model("mlp", (1, 8, 8), 10, seed=0)
    assert torch.equal(torch.rand(5), after_plain)


def test_unknown_model_raises():
    with pytest.raises(ConfigError, match="model") as info:
        build_model("vgg", (3, 32, 32), 10)
    assert info.value.key == "model" and info.value.value == "vgg"
