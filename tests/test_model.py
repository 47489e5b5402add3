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
