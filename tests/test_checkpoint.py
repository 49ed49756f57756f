"""Checkpoints: self-describing, identical logits after a round trip, one clear error when unusable."""

import pytest
import torch

from conftest import randomize
from pixelcnn import CheckpointError, PixelCNN, load_checkpoint, load_model, save_checkpoint
from pixelcnn.checkpoint import checkpoint_dict


def saved(tmp_path, model, name="model.pt", **kw):
    path = tmp_path / name
    save_checkpoint(path, checkpoint_dict(model, step=7, dataset="mnist", **kw))
    return path


def test_round_trip_gives_identical_logits(tmp_path):
    model = randomize(PixelCNN(in_channels=3, image_size=(6, 5), hidden=8, blocks=2, norm="batch"))
    model.eval()
    path = saved(tmp_path, model)
    loaded = load_model(path)
    x = torch.rand(3, 3, 6, 5)
    assert torch.equal(model(x), loaded(x))
    assert not loaded.training and loaded.config == model.config
    ckpt = load_checkpoint(tmp_path)  # a folder holding model.pt works too
    assert ckpt["step"] == 7 and ckpt["data_shape"] == [3, 6, 5] and ckpt["model_class"] == "PixelCNN"


def test_no_temporary_files_left(tmp_path):
    saved(tmp_path, PixelCNN(hidden=8, blocks=1))
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def one_line_error(path, **kw):
    with pytest.raises(CheckpointError) as info:
        load_model(path, **kw)
    message = str(info.value)
    assert "\n" not in message and len(message) < 400
    return message


def test_missing_file(tmp_path):
    assert "not found" in one_line_error(tmp_path / "nope.pt")


def test_corrupt_file(tmp_path):
    path = saved(tmp_path, PixelCNN(hidden=8, blocks=1))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert "corrupt" in one_line_error(path)
    path.write_bytes(b"not a checkpoint at all")
    message = one_line_error(path)
    assert "corrupt" in message and "refused by the weights-only loader" in message
    assert "weights_only" not in message, "torch's advice to load unsafely must not be passed on"
    for junk in (b"", b"hello"):  # the unpickler's own words here are "EOFError" and "101"
        path.write_bytes(junk)
        assert one_line_error(path).endswith("is corrupt or not a PixelCNN checkpoint (not a file torch.save wrote)")


def test_foreign_pickle_is_refused_without_running_it(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (exec, ("open('%s', 'w').write('pwned')" % (tmp_path / "pwned"),))

    path = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, path, pickle_module=pickle)
    message = one_line_error(path)
    assert "corrupt" in message and "Unsupported global" in message
    assert "weights_only" not in message and "safe_globals" not in message  # no advice to load it anyway
    assert not (tmp_path / "pwned").exists()


def test_other_torch_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(PixelCNN(hidden=8, blocks=1).state_dict(), path)
    assert "not a PixelCNN checkpoint" in one_line_error(path)


def test_weights_of_another_shape(tmp_path):
    path = saved(tmp_path, PixelCNN(hidden=8, blocks=1))
    ckpt = torch.load(path, weights_only=True)
    ckpt["model_config"]["hidden"] = 16  # config and weights disagree
    torch.save(ckpt, path)
    assert "does not match" in one_line_error(path)


@pytest.mark.parametrize("blocks,named", [(2, "Missing key"), (0, "Unexpected key")])
def test_weights_of_another_depth(tmp_path, blocks, named):
    """A config with more or fewer blocks than the weights: every tensor must be there, and no other."""
    path = saved(tmp_path, PixelCNN(hidden=8, blocks=1))
    ckpt = torch.load(path, weights_only=True)
    ckpt["model_config"]["blocks"] = blocks
    torch.save(ckpt, path)
    message = one_line_error(path)
    assert "does not match its model config" in message and named in message


def test_a_model_class_that_is_not_a_name(tmp_path):
    path = saved(tmp_path, PixelCNN(hidden=8, blocks=1))
    ckpt = torch.load(path, weights_only=True)
    ckpt["model_class"] = ["PixelCNN"]
    torch.save(ckpt, path)
    assert "unknown model class ['PixelCNN']" in one_line_error(path)


def test_data_shape_mismatch(tmp_path):
    path = saved(tmp_path, PixelCNN(hidden=8, blocks=1))
    assert "trained on images [1, 28, 28]" in one_line_error(path, data_shape=(3, 32, 32))
