"""Your own images (pixelcnn/images.py): folders and Parquet, exact 8-bit levels, resize and convert, a
stable held-out split, fingerprints, and one clear line for each bad input."""

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pixelcnn import DataError, load_dataset
from pixelcnn.images import ImageOptions, find_images, in_test_split


def make_folder(root, classes=("cats", "dogs", "owls"), per_class=20, size=(6, 5), seed=0):
    """RGB images in class subfolders, PNG and lossless WebP (exact levels), random pixels."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            array = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            path = root / name / f"{k:03d}.{'png' if k % 2 else 'webp'}"
            Image.fromarray(array).save(path, lossless=True) if path.suffix == ".webp" else Image.fromarray(array).save(path)
            arrays[f"{name}/{path.name}"] = (array, c)
    return arrays


def png_bytes(array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_folder_of_class_subfolders_loads_exact_levels_with_labels(tmp_path):
    arrays = make_folder(tmp_path)
    train = load_dataset(str(tmp_path), train=True, test_fraction=0.2)
    test = load_dataset(str(tmp_path), train=False, test_fraction=0.2)
    assert train.classes == ("cats", "dogs", "owls") and train.num_classes == 3
    assert len(train) + len(test) == 60 and 0 < len(test) < 30
    assert set(train.keys).isdisjoint(test.keys) and set(train.keys) | set(test.keys) == set(arrays)
    for data in (train, test):
        assert data.images.dtype == torch.uint8 and data.shape == (3, 6, 5)
        for k, key in enumerate(data.keys):
            array, label = arrays[key]
            assert np.array_equal(data.images[k].numpy(), array.transpose(2, 0, 1)), key  # the decoded levels
            assert data.labels[k] == label
    assert data.keys == sorted(data.keys)  # source order: files sorted by path


def test_the_test_split_is_a_hash_of_each_key_so_it_never_moves(tmp_path):
    make_folder(tmp_path / "a", per_class=30)
    keys = find_images(str(tmp_path / "a"))
    held = load_dataset(str(tmp_path / "a"), train=False).keys
    assert held == [k for k, t in zip(sorted(held + load_dataset(str(tmp_path / "a")).keys), in_test_split(
        sorted(held + load_dataset(str(tmp_path / "a")).keys), 0.05)) if t]
    # a copy elsewhere, and more files beside them: the same images stay held out
    make_folder(tmp_path / "b", per_class=30)
    make_folder(tmp_path / "b" / "extra", classes=("x",), per_class=5, seed=1)
    assert keys.fingerprint != find_images(str(tmp_path / "b")).fingerprint
    again = set(load_dataset(str(tmp_path / "b"), train=False).keys)
    assert set(held) <= again
    fraction = np.mean(in_test_split([f"img{k}.png" for k in range(20000)], 0.05))
    assert 0.045 < fraction < 0.055


def test_parquet_with_png_bytes_a_hugging_face_struct_and_labels(tmp_path):
    hf, tmp_path = tmp_path / "hf", tmp_path / "ours"
    tmp_path.mkdir()
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (4, 4), dtype=np.uint8) for _ in range(12)]
    pq.write_table(pa.table({"image_png": [png_bytes(a) for a in arrays[:7]], "label": list(range(7))}),
                   tmp_path / "a.parquet", row_group_size=3)
    pq.write_table(pa.table({"image_png": [png_bytes(a) for a in arrays[7:]], "label": list(range(5))}),
                   tmp_path / "b.parquet")
    data = load_dataset(str(tmp_path), test_fraction=0)
    assert [k for k in data.keys] == [f"a.parquet#{r}" for r in range(7)] + [f"b.parquet#{r}" for r in range(5)]
    assert all(np.array_equal(data.images[k, 0].numpy(), arrays[k]) for k in range(12))
    assert data.labels.tolist() == list(range(7)) + list(range(5)) and data.num_classes == 7
    hf.mkdir()
    struct = pa.array([{"bytes": png_bytes(a), "path": f"{k}.png"} for k, a in enumerate(arrays)])
    pq.write_table(pa.table({"img": struct, "y": list(range(12))}), hf / "train.parquet")
    data = load_dataset(str(hf / "*.parquet"), test_fraction=0, image_column="img", label_column="y")
    assert all(np.array_equal(data.images[k, 0].numpy(), arrays[k]) for k in range(12)) and data.labels.tolist() == list(range(12))
    # A range in the middle of a file reads only its row groups, and the right rows
    from pixelcnn.images import read_range

    source = find_images(str(tmp_path))
    rows = read_range(source, pa.fs.LocalFileSystem(), 4, 9, ImageOptions())
    assert rows.index.tolist() == [4, 5, 6, 7, 8] and rows.keys[-1] == "b.parquet#1"
    assert np.array_equal(rows.images[0, 0], arrays[4])


def test_resize_and_convert(tmp_path):
    Image.fromarray(np.full((10, 20, 3), 200, dtype=np.uint8)).save(tmp_path / "wide.png")
    Image.fromarray(np.full((8, 8), 17, dtype=np.uint8)).save(tmp_path / "small.png")
    with pytest.raises(DataError, match="images differ in size or mode: small.png is 8x8 L, wide.png is 10x20 RGB: "
                                        "pass --image-size and --channels"):
        load_dataset(str(tmp_path), test_fraction=0)
    data = load_dataset(str(tmp_path), test_fraction=0, image_size=(4, 4), channels=1)
    assert data.shape == (1, 4, 4)
    assert data.images[0].unique().tolist() == [17]  # 8x8 flat grey: resized, still 17
    assert data.images[1].unique().tolist() == [200]  # RGB (200, 200, 200) -> L 200, centre-cropped
    square = load_dataset(str(tmp_path / "small.png"), test_fraction=0, image_size=(8, 8), channels=1)
    assert square.images[0].unique().tolist() == [17]  # already that size: untouched


@pytest.mark.parametrize("case", ["undecodable", "empty", "no-column", "glob", "negative-label", "rgba", "all-test",
                                  "missing"])
def test_bad_input_is_one_line(case, tmp_path):
    kwargs = {"test_fraction": 0}
    if case == "undecodable":
        make_folder(tmp_path, per_class=2)
        (tmp_path / "dogs" / "broken.png").write_bytes(png_bytes(np.zeros((6, 5, 3), dtype=np.uint8))[:40])
        match = "dogs/broken.png is not a decodable image"
    elif case == "empty":
        (tmp_path / "notes.txt").write_text("no images here")
        match = "holds no images"
    elif case == "no-column":
        pq.write_table(pa.table({"pixels": [b"x"], "label": [1]}), tmp_path / "a.parquet")
        match = "a.parquet has no image column .*: its columns are pixels, label"
    elif case == "glob":
        make_folder(tmp_path, per_class=1)
        tmp_path = tmp_path / "*.parquet"
        match = "holds no images"
    elif case == "negative-label":
        pq.write_table(pa.table({"image": [png_bytes(np.zeros((2, 2), np.uint8))], "label": [-3]}), tmp_path / "a.parquet")
        match = "a.parquet#0: label -3 is out of range"
    elif case == "rgba":
        Image.fromarray(np.zeros((2, 2, 4), np.uint8)).save(tmp_path / "x.png")
        match = "x.png is a RGBA image: pass --channels 1 or 3"
    elif case == "all-test":
        make_folder(tmp_path, per_class=1)
        kwargs = {"test_fraction": 0.99}
        match = "the training split of .* is empty"
    elif case == "missing":
        tmp_path = tmp_path / "nowhere"
        match = "does not exist"
    with pytest.raises(DataError, match=match) as info:
        load_dataset(str(tmp_path), **kwargs)
    assert "\n" not in str(info.value)


def test_skip_bad_images_skips_and_counts(tmp_path):
    make_folder(tmp_path, per_class=2)
    (tmp_path / "dogs" / "broken.png").write_bytes(b"not a png")
    data = load_dataset(str(tmp_path), test_fraction=0, skip_bad_images=True)
    assert len(data) == 6 and "dogs/broken.png" not in data.keys
