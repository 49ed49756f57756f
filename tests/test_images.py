"""Your own images (pixelcnn/images.py): folders and Parquet, exact 8-bit levels, resize and convert, a
stable held-out split, fingerprints, and one clear line for each bad input."""

import io
import os

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


@pytest.mark.parametrize("case", ["undecodable", "empty", "no-column", "glob", "negative-label", "palette", "all-test",
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
    elif case == "palette":
        Image.fromarray(np.zeros((2, 2), np.uint8), "P").save(tmp_path / "x.png")
        match = "x.png is a P image: pass --channels 1 or 3"
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


# --- issue 32: transparency, EXIF orientation, file names, label gaps, 16-bit images ---------------


def test_transparent_pixels_are_refused_unless_composited_onto_a_named_background(tmp_path):
    rgba = np.zeros((2, 4, 4), np.uint8)
    rgba[..., 1] = 255  # green everywhere, also under the transparent pixels
    rgba[:, :2, 3] = 255  # left half opaque, right half fully transparent
    rgba[1, 3, 3] = 128  # one half-transparent pixel
    Image.fromarray(rgba).save(tmp_path / "x.png")
    with pytest.raises(DataError, match=r"^x.png has transparent pixels: pass --background") as info:
        load_dataset(str(tmp_path), test_fraction=0, channels=3)
    assert "\n" not in str(info.value)
    white = load_dataset(str(tmp_path), test_fraction=0, channels=3, background="white").images[0].numpy()
    assert (white[:, :, :2] == np.array([0, 255, 0])[:, None, None]).all()  # opaque pixels untouched
    assert (white[:, 0, 2:] == 255).all() and white[:, 1, 2].tolist() == [255, 255, 255]  # hidden green never shows
    assert white[:, 1, 3].tolist() == [127, 255, 127]  # (0 * 128 + 255 * 127 + 127) // 255: half and half
    black = load_dataset(str(tmp_path), test_fraction=0, background="black").images[0].numpy()  # RGB without --channels
    assert black.shape == (3, 2, 4) and (black[:, 0, 2:] == 0).all()
    colour = load_dataset(str(tmp_path), test_fraction=0, background="10,20,30").images[0].numpy()
    assert colour[:, 0, 3].tolist() == [10, 20, 30]
    # LA likewise, into one channel
    Image.fromarray(np.stack([np.full((2, 4), 90, np.uint8), rgba[..., 3]], -1), "LA").save(tmp_path / "x.png")
    with pytest.raises(DataError, match="x.png has transparent pixels: pass --background"):
        load_dataset(str(tmp_path), test_fraction=0, channels=1)
    grey = load_dataset(str(tmp_path), test_fraction=0, channels=1, background="white").images[0, 0].numpy()
    assert grey[0].tolist() == [90, 90, 255, 255]


def test_an_opaque_alpha_channel_is_dropped_and_palette_transparency_counts(tmp_path):
    rgba = np.random.default_rng(0).integers(0, 256, (3, 5, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    Image.fromarray(rgba).save(tmp_path / "opaque.png")
    data = load_dataset(str(tmp_path), test_fraction=0)  # no --channels, no --background needed
    assert np.array_equal(data.images[0].numpy(), rgba[..., :3].transpose(2, 0, 1))
    (tmp_path / "opaque.png").unlink()
    palette = Image.fromarray(np.array([[0, 1], [1, 1]], np.uint8), "P")
    palette.putpalette([0, 255, 0, 200, 0, 0])  # 0: green (transparent by tRNS), 1: red
    palette.save(tmp_path / "p.png", transparency=0)
    with pytest.raises(DataError, match="p.png has transparent pixels: pass --background"):
        load_dataset(str(tmp_path), test_fraction=0, channels=3)
    data = load_dataset(str(tmp_path), test_fraction=0, channels=3, background="black")
    assert data.images[0, :, 0, 0].tolist() == [0, 0, 0] and data.images[0, :, 1, 1].tolist() == [200, 0, 0]


def test_skip_bad_images_skips_transparent_images(tmp_path):
    make_folder(tmp_path, per_class=2)
    Image.fromarray(np.zeros((6, 5, 4), np.uint8)).save(tmp_path / "dogs" / "clear.png")
    data = load_dataset(str(tmp_path), test_fraction=0, skip_bad_images=True, channels=3)
    assert len(data) == 6 and "dogs/clear.png" not in data.keys
    from pixelcnn.images import read_range

    source = find_images(str(tmp_path))
    options = ImageOptions(skip_bad_images=True, channels=3)
    assert read_range(source, pa.fs.LocalFileSystem(), 0, len(source), options).bad == ["dogs/clear.png"]


def test_background_is_one_flag_of_the_training_and_scoring_jobs(tmp_path, capsys):
    from jobs import score, train

    cfg, _ = train.parse_args(["--dataset", str(tmp_path), "--background", "10,20,30"])
    assert cfg.background == (10, 20, 30) and cfg.image_options().background == (10, 20, 30)
    request = score.parse_args(["--checkpoint", "c", "--dataset", str(tmp_path), "--output", "o", "--background", "white"])
    assert request.background == (255, 255, 255)
    with pytest.raises(SystemExit) as exit:
        train.parse_args(["--dataset", str(tmp_path), "--background", "pink"])
    assert exit.value.code == 2 and "--background" in capsys.readouterr().err
    with pytest.raises(DataError, match="--background"):
        ImageOptions(background="1,2")


def test_exif_orientation_is_applied_as_viewers_do(tmp_path):
    array = np.zeros((16, 8, 3), np.uint8)
    array[:8, :4] = (250, 0, 0)  # a red block top left, a blue one bottom right: stored sideways
    array[8:, 4:] = (0, 0, 250)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(array).save(tmp_path / "photo.jpg", quality=95, exif=exif)
    stored = np.asarray(Image.open(tmp_path / "photo.jpg"))  # the JPEG's own pixels, as stored
    data = load_dataset(str(tmp_path), test_fraction=0)
    assert data.shape == (3, 8, 16)  # 16 high x 8 wide stored: 8 high x 16 wide shown
    assert np.array_equal(data.images[0].numpy(), np.rot90(stored, k=-1).transpose(2, 0, 1))


def test_a_file_name_that_is_not_utf8_is_read_like_any_other(tmp_path):
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    fd = os.open(os.fsencode(tmp_path) + b"/caf\xe9.png", os.O_WRONLY | os.O_CREAT)  # Latin-1 'café.png'
    os.write(fd, png_bytes(array))
    os.close(fd)
    Image.fromarray(array + 1).save(tmp_path / "plain.png")
    data = load_dataset(str(tmp_path), test_fraction=0)
    assert data.keys == ["caf\\xe9.png", "plain.png"]  # the byte shown escaped: a name any UTF-8 reader takes
    assert np.array_equal(data.images[0, 0].numpy(), array)
    source = find_images(str(tmp_path))
    assert pa.array([source.uri_of(0)]).to_pylist() == [f"{tmp_path}/caf\\xe9.png"]  # the scoring job's source column
    assert in_test_split(data.keys, 0.5).shape == (2,)
    # Parquet under such a name too
    fd = os.open(os.fsencode(tmp_path) + b"/t\xe9.parquet", os.O_WRONLY | os.O_CREAT)
    buffer = pa.BufferOutputStream()
    pq.write_table(pa.table({"image_png": [png_bytes(array)]}), buffer)
    os.write(fd, buffer.getvalue().to_pybytes())
    os.close(fd)
    assert load_dataset(str(tmp_path), test_fraction=0).keys == ["t\\xe9.parquet#0"]


def test_a_label_gap_is_refused_for_conditional_training(tmp_path):
    from pixelcnn.config import TrainConfig
    from pixelcnn.training import Runtime

    arrays = [np.full((4, 4), k, np.uint8) for k in range(6)]
    pq.write_table(pa.table({"image_png": [png_bytes(a) for a in arrays], "label": [0, 1, 5, 0, 1, 5]}),
                   tmp_path / "a.parquet")
    cfg = TrainConfig(dataset=str(tmp_path / "a.parquet"), conditional=True, batch_size=2, test_fraction=0)
    with pytest.raises(DataError, match=r"labels must be 0\.\.K-1 with every class present: found 0, 1, 5 "
                                        r"\(missing 2, 3, 4\)") as info:
        Runtime(str(tmp_path / "run")).load_data(cfg)
    assert "\n" not in str(info.value)
    batches, _ = Runtime(str(tmp_path / "run")).load_data(TrainConfig(dataset=cfg.dataset, batch_size=2, test_fraction=0))
    assert batches.num_classes == 6  # unconditional: the labels are not the model's classes, nothing refused
    pq.write_table(pa.table({"image_png": [png_bytes(a) for a in arrays], "label": [0, 1, 2, 0, 1, 2]}),
                   tmp_path / "a.parquet")
    assert Runtime(str(tmp_path / "run")).load_data(cfg)[0].num_classes == 3


def test_16_bit_images_of_8_bit_levels_are_accepted_and_others_refused_with_advice_that_works(tmp_path):
    levels = np.arange(12, dtype=np.uint16).reshape(3, 4) * 20
    Image.fromarray(levels * 257).save(tmp_path / "deep.png")  # 16-bit grey PNG, every value k * 257
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    for channels in (None, 1):
        data = load_dataset(str(tmp_path), test_fraction=0, channels=channels)
        assert np.array_equal(data.images[0, 0].numpy(), levels)
    Image.fromarray(levels * 257 + 1).save(tmp_path / "deep.png")
    for channels in (None, 1, 3):
        with pytest.raises(DataError, match=r"^deep.png is a 16-bit image whose values are not all 8-bit levels "
                                            r"\(multiples of 257\): convert it to 8-bit first") as info:
            load_dataset(str(tmp_path), test_fraction=0, channels=channels)
        assert "--channels" not in str(info.value)
