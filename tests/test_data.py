"""Data: exact integer targets, quantisation, subsets, MNIST from the local root, clear errors."""

import pytest
import torch

from pixelcnn.data import DataError, levels_to_input, load_dataset, quantize


def test_all_256_values_round_trip_through_model_input():
    levels = torch.arange(256, dtype=torch.uint8)
    x = levels_to_input(levels)
    assert x.min() == 0.0 and x.max() == 1.0
    # The naive faults: ceil(x*255) and truncation after float maths must not be needed, but check
    # that rounding the model input recovers every level exactly in float32 and float64.
    for dtype in (torch.float32, torch.float64):
        back = torch.round(levels_to_input(levels, 256, dtype) * 255).to(torch.uint8)
        assert torch.equal(back, levels)


def test_quantize_is_integer_arithmetic():
    pixels = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(quantize(pixels, 256), pixels)
    four = quantize(pixels, 4)
    assert four.tolist() == [v // 64 for v in range(256)]


def test_mnist_targets_are_the_uint8_values(mnist_root):
    import gzip

    data = load_dataset("mnist", mnist_root, train=False, subset=100)
    assert data.images.dtype == torch.uint8 and data.images.shape == (100, 1, 28, 28)
    assert data.labels.shape == (100,) and data.num_classes == 10
    # compare with the raw IDX file, bypassing torchvision
    raw = mnist_root / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz"
    with gzip.open(raw) as f:
        payload = f.read()[16:16 + 100 * 784]
    assert torch.equal(data.images.flatten(), torch.frombuffer(bytearray(payload), dtype=torch.uint8))
    assert data.images.max() == 255 and data.images.min() == 0


def test_full_mnist_split_sizes(mnist_root):
    assert len(load_dataset("mnist", mnist_root, train=True)) == 60000
    assert len(load_dataset("mnist", mnist_root, train=False)) == 10000


def test_synthetic_is_deterministic_and_two_class():
    a, b = load_dataset("synthetic", None, subset=64), load_dataset("synthetic", None, subset=64)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert set(a.labels.tolist()) == {0, 1} and a.shape == (1, 12, 12)


def test_missing_data_root_is_one_clear_error(tmp_path):
    with pytest.raises(DataError, match="does not exist") as info:
        load_dataset("mnist", tmp_path / "nowhere")
    assert "\n" not in str(info.value)


def test_root_without_the_dataset_is_one_clear_error(tmp_path):
    with pytest.raises(DataError, match="not found under data root") as info:
        load_dataset("fashion_mnist", tmp_path)
    assert "\n" not in str(info.value)


def test_unknown_dataset():
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("imagenet", "/tmp")


def test_mnist_read_from_its_idx_files_is_what_torchvision_reads(mnist_root):
    """The IDX files are read without torchvision (its import costs every process ~2 s): the same images and
    labels as torchvision's MNIST, for both splits' labels and the test split's images."""
    from pixelcnn._torchvision import import_torchvision

    datasets = import_torchvision().datasets
    for train in (False, True):
        ours = load_dataset("mnist", mnist_root, train=train)
        theirs = datasets.MNIST(root=mnist_root, train=train)
        assert torch.equal(ours.labels, torch.as_tensor(theirs.targets, dtype=torch.int64))
        if not train:
            assert torch.equal(ours.images, torch.as_tensor(theirs.data)[:, None])


def test_a_truncated_idx_file_is_one_clear_error(mnist_root, tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (raw / name).write_bytes((mnist_root / "MNIST" / "raw" / name).read_bytes()[:1000])
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte is not an IDX file") as info:
        load_dataset("mnist", tmp_path, train=False)
    assert "\n" not in str(info.value)
