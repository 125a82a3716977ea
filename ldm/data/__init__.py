"""Image datasets for training: MNIST, Fashion-MNIST, CIFAR-10 and image folders.

    from ldm.data import load_dataset
    data = load_dataset("mnist-bundled", image_size=32)   # offline, ships with ldm
    x, y = data.batch(torch.randint(len(data), (64,)))     # x in [-1, 1]
"""

from .dataset import DATASETS, ImageDataset, load_dataset
from .download import ChecksumError, DatasetUnavailableError

__all__ = ["DATASETS", "ChecksumError", "DatasetUnavailableError", "ImageDataset", "load_dataset"]
