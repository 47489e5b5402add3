"""The recipe's CIFAR ResNet18."""
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock

from app.model import cifar_resnet18, count_parameters


def test_has_the_recipe_parameter_count() -> None:
    assert count_parameters(cifar_resnet18(100)) == 11_220_132


def test_keeps_full_resolution_stem_and_outputs_100_logits() -> None:
    model = cifar_resnet18(100)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    assert sum(isinstance(m, BasicBlock) for m in model.modules()) == 8
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 100)


def test_every_convolution_stem_included_has_he_normal_init_by_fan_out() -> None:
    """torchvision initialises the convs it builds with kaiming_normal_(mode="fan_out"); the CIFAR stem,
    swapped in afterwards, must get the same (PyTorch's default would be uniform with std 0.111)."""
    torch.manual_seed(0)
    model = cifar_resnet18(100)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert model.conv1 is convs[0]
    for conv in convs:
        w = conv.weight.detach()
        fan_out = w.shape[0] * w.shape[2] * w.shape[3]
        expected = (2.0 / fan_out) ** 0.5
        assert abs(w.std().item() / expected - 1) < 0.1, (conv, w.std().item(), expected)
        # Normal, not uniform: about 4.6% of the weights lie beyond two standard deviations (none would,
        # for a uniform distribution of the same spread).
        beyond = (w.abs() > 2 * expected).float().mean().item()
        assert 0.03 < beyond < 0.065, (conv, beyond)
