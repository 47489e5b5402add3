"""The data sets a run can train on (`data.dataset`), each described once: where its files lie, which keys
hold its labels and class names, where torchvision downloads it from, and the defaults that follow it (the
class count, and the normalisation of its training pixels). No torch or numpy here: the config's checks
read it, and a config error answers without importing either.
"""
from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal

DataSetName = Literal["cifar100", "cifar10"]


@dataclass(frozen=True)
class DataSet:
    title: str  # how messages name it
    folder: str  # under data.root, as the archive extracts
    train_files: tuple[str, ...]  # the training images, in this order
    test_file: str
    meta_file: str
    labels_key: str  # in each data file: a list of N integers in 0..classes-1
    names_key: str  # in the meta file: a list of `classes` strings
    archive: str  # what to download by hand; torchvision's own download fetches the same
    torchvision_class: str  # in torchvision.datasets
    classes: int
    # Of the training images' pixels scaled to [0, 1], per channel: the mean and the population standard
    # deviation over every pixel of the training set (not the mean of each image's std, which some code
    # quotes for CIFAR-10 as 0.2023, 0.1994, 0.2010).
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


DATASETS: dict[str, DataSet] = {
    "cifar100": DataSet(
        title="CIFAR-100", folder="cifar-100-python", train_files=("train",), test_file="test", meta_file="meta",
        labels_key="fine_labels", names_key="fine_label_names",
        archive="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", torchvision_class="CIFAR100",
        classes=100, mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762)),
    # mean and std as numpy computes them over torchvision's CIFAR10(train=True).data, / 255: (0.49139968,
    # 0.48215841, 0.44653091) and (0.24703223, 0.24348513, 0.26158784) (github.com/MadryLab/robustness issue
    # 70, kuangliu/pytorch-cifar issues 19 and 129); fb.resnet.torch's 63.0, 62.1, 66.7 (of 255) are these
    # too. The CIFAR-100 values above are the same convention (fb.resnet.torch's CIFAR-100 std 68.2, 65.4,
    # 70.4 of 255, github.com/szagoruyko/wide-residual-networks issue 29).
    "cifar10": DataSet(
        title="CIFAR-10", folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)), test_file="test_batch", meta_file="batches.meta",
        labels_key="labels", names_key="label_names",
        archive="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", torchvision_class="CIFAR10",
        classes=10, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)),
}
assert set(DATASETS) == set(typing.get_args(DataSetName))  # the config's choices are the data sets described
