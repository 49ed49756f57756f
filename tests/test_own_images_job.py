"""jobs/train.py on your own images: a folder of PNGs and JPEGs in class subfolders, local and on the
loopback S3 endpoint, read by Ray Data; Parquet written by jobs/generate.py; exact test figures; one line
for each bad input."""

import io
import json
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import PYTHON, REPO, last_json_line, one_error_line, randomize, ray_info_lines, run_job, run_main, start_job
from pixelcnn import PixelCNN, evaluate, load_dataset, load_model
from pixelcnn.checkpoint import checkpoint_dict, save_checkpoint

pytestmark = pytest.mark.slow

FLAGS = ["--hidden", 8, "--blocks", 1, "--batch-size", 32, "--epochs", 1, "--grid-samples", 4, "--log-every", 4,
         "--ema", 0.9, "--test-fraction", 0.1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory, s3):
    """300 8x8 RGB images in three class subfolders, half PNG, half JPEG; also uploaded to S3."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c, name in enumerate(("cats", "dogs", "owls")):
        (root / name).mkdir()
        for k in range(100):
            array = rng.integers(0, 96, (8, 8, 3), dtype=np.uint8)
            array[..., c] += 150  # each class its own colour
            path = root / name / f"{k:03d}.{'png' if k % 2 else 'jpg'}"
            Image.fromarray(array).save(path)
            s3.client.upload_file(str(path), "pixelcnn", f"images/{name}/{path.name}")
    return root


@pytest.fixture(scope="module")
def teacher_samples(ray_cluster, tmp_path_factory):
    """Samples of a small model as generate.py writes them (test_the_generation_jobs_parquet_trains_as_a_dataset),
    started in the background by the module's first test (a job mostly waits on Ray's start-up): (their
    folder, the job)."""
    root = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(0)
    teacher = randomize(PixelCNN(hidden=8, blocks=1, image_size=(6, 6)), std=0.2)
    save_checkpoint(root / "teacher" / "model.pt", checkpoint_dict(teacher, step=1, dataset="test"))
    job = start_job("generate.py", "--checkpoint", root / "teacher", "--num-samples", 160, "--rows-per-file", 80,
                    "--cpus-per-actor", 0.5, "--output", root / "samples", env=ray_cluster.env)
    yield root / "samples", job
    job.stop()


@pytest.mark.usefixtures("teacher_samples")  # started here, to run beside this test's job
def test_a_folder_on_s3_trains_with_two_workers_to_one_process_weights_and_an_exact_test_figure(folder, ray_cluster, s3,
                                                                                                  tmp_path):
    """On S3 through Ray Data: labels are the folder classes, the model is RGB at the images' size, the
    reported test bits/dim is pixelcnn.evaluate's on the same test images loaded from disk, and two workers
    reach the weights one process computes from the local copy (data in memory is batched by (seed, epoch,
    step) alone). A rerun of the name on other data under the same folder is refused, stored -> requested."""
    args = ["--dataset", "s3://pixelcnn/images", *FLAGS, "--conditional", "--storage", "s3://pixelcnn/runs", "--name", "own"]
    proc = run_job("train.py", *args, "--num-workers", 2, env=ray_cluster.env)
    final = last_json_line(proc.stdout)
    assert final["done"] and final["world_size"] == 2
    assert "data: " in proc.stdout and "3 classes, in memory" in proc.stdout
    assert not ray_info_lines(proc.stdout + proc.stderr)  # the workers read Ray Datasets, quietly
    data = s3.client.get_object(Bucket="pixelcnn", Key="runs/own/model.pt")["Body"].read()
    (tmp_path / "model.pt").write_bytes(data)
    model = load_model(tmp_path / "model.pt")
    assert (model.config.in_channels, model.config.image_size, model.config.num_classes) == (3, (8, 8), 3)
    config = json.loads(s3.client.get_object(Bucket="pixelcnn", Key="runs/own/config.json")["Body"].read())
    assert config["dataset_classes"] == 3 and config["dataset_shape"] == [3, 8, 8] and config["dataset_fingerprint"]
    test = load_dataset(str(folder), train=False, test_fraction=0.1)  # the same held-out images, from disk
    assert test.num_classes == 3 and set(test.labels.tolist()) == {0, 1, 2}
    exact = evaluate(model, test)["bits_per_dim"]
    assert final["test_bits_per_dim"] == pytest.approx(exact, rel=1e-9)

    # One process (pixelcnn.training.train, no Ray) on the local copy of the folder: the same weights.
    from jobs.train import parse_args
    from pixelcnn.training import Runtime, train

    cfg, _ = parse_args([str(a) for a in ["--dataset", folder, *FLAGS, "--conditional"]])
    train(cfg, Runtime(str(tmp_path / "one"), log=lambda *a, **k: None))
    one = torch.load(tmp_path / "one" / "model.pt", weights_only=True)["training"]["raw_state"]
    two = torch.load(tmp_path / "model.pt", weights_only=True)["training"]["raw_state"]
    for name, value in one.items():
        assert torch.allclose(value, two[name], atol=2e-5, rtol=1e-4), name
    torch.manual_seed(0)
    init = PixelCNN(in_channels=3, image_size=(8, 8), hidden=8, blocks=1, num_classes=3).state_dict()
    assert any(not torch.allclose(init[n], one[n]) for n in init)  # training moved them

    buffer = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buffer, format="PNG")
    s3.client.put_object(Bucket="pixelcnn", Key="images/cats/new.png", Body=buffer.getvalue())
    try:
        proc = run_main("train.py", *args, "--epochs", 2, env=ray_cluster.env)
        assert "was trained on other data under" in one_error_line(proc)
    finally:
        s3.client.delete_object(Bucket="pixelcnn", Key="images/cats/new.png")


def test_the_generation_jobs_parquet_trains_as_a_dataset(ray_cluster, tmp_path, teacher_samples):
    """Distillation: samples of one model, as generate.py writes them, are another model's training data."""
    samples, job = teacher_samples
    job.result()
    proc = run_job("train.py", "--dataset", samples, "--hidden", 8, "--blocks", 1, "--batch-size", 32,
                   "--grid-samples", 0, "--storage", tmp_path / "runs", "--name", "student", env=ray_cluster.env)
    assert last_json_line(proc.stdout)["done"]
    student = load_model(tmp_path / "runs" / "student")
    assert (student.config.in_channels, student.config.image_size, student.config.num_classes) == (1, (6, 6), 0)


STREAMED = """
import json, os, sys, numpy as np, torch, ray, ray.train
from ray.train.torch import TorchTrainer
from jobs.datasets import find_source, read_images
from jobs.train import StreamedBatches
from pixelcnn.config import TrainConfig

def loop(config):
    cfg = TrainConfig.from_dict(config["cfg"])
    context = ray.train.get_context()
    batches = StreamedBatches(ray.train.get_dataset_shard("train"), cfg, context.get_world_rank(),
                              context.get_world_size(), "cpu")
    seen = []
    for epoch in range(2):
        steps = [(len(b.levels), b.total, [bytes(image.numpy().tobytes()) for image in b.levels]) for b in batches.epoch(epoch)]
        seen.append({"steps": len(steps), "sizes": sorted({s[0] for s in steps}), "totals": sorted({s[1] for s in steps}),
                     "images": [k.hex() for s in steps for k in s[2]]})
    with open(f"{config['out']}/seen-{context.get_world_rank()}.json", "w") as f:
        json.dump({"seen": seen, "per_epoch": batches.steps_per_epoch}, f)

ray.init(address=os.environ["RAY_ADDRESS"])  # the session's cluster
source, s3 = find_source(sys.argv[1], None, TrainConfig(dataset=sys.argv[1]).image_options(test_fraction=0))
options = TrainConfig(dataset=sys.argv[1], test_fraction=0).image_options()
cfg = TrainConfig(dataset=sys.argv[1], batch_size=7, test_fraction=0, dataset_shape=(3, 8, 8), dataset_train_images=len(source))
data = read_images(source, s3, options, rows_per_task=32).randomize_block_order()
results = []
trainer = TorchTrainer(loop, train_loop_config={"cfg": cfg.to_dict(), "out": sys.argv[2]}, datasets={"train": data},
                       scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
                       dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
                       run_config=ray.train.RunConfig(storage_path=sys.argv[2], name="streamed"))
trainer.fit()
print("DONE")
"""


def test_the_streamed_path_sees_no_image_twice_in_an_epoch(folder, ray_cluster, tmp_path):
    """Data too large for memory streams through Ray Data's split: what it guarantees is that each epoch is
    floor(floor(N / workers) / ceil(B / workers)) global batches of exactly B images, each worker its exact
    share, and no image twice in an epoch (which images form a batch depends on Ray Data's scheduling)."""
    proc = subprocess.run([PYTHON, "-c", STREAMED, str(folder), str(tmp_path)], cwd=REPO,
                          env={**ray_cluster.env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300)
    assert "DONE" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"seen-{rank}.json").read_text()) for rank in (0, 1)]
    per_epoch = (300 // 2) // 4  # ceil(7 / 2) = 4 images per step for the larger share
    for rank, share in ((0, 3), (1, 4)):  # shares of 7: 7 * r // 2 .. 7 * (r + 1) // 2
        assert ranks[rank]["per_epoch"] == per_epoch
        for epoch in ranks[rank]["seen"]:
            assert epoch["steps"] == per_epoch and epoch["sizes"] == [share] and epoch["totals"] == [7]
    for epoch in (0, 1):
        images = ranks[0]["seen"][epoch]["images"] + ranks[1]["seen"][epoch]["images"]
        assert len(images) == 7 * per_epoch and len(set(images)) == len(images)  # no image twice, across workers


@pytest.mark.parametrize("case", ["undecodable", "sizes", "empty", "glob", "no-column", "unlabelled", "test-empty",
                                  "bucket", "subset"])
def test_bad_data_is_one_line_and_leaves_the_run_folder_as_it_was(case, folder, s3, ray_cluster, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    extra = []
    if case in ("undecodable", "sizes", "unlabelled", "test-empty", "subset"):
        for k in range(40):
            Image.fromarray(np.full((8, 8, 3), k, np.uint8)).save(data / f"{k}.png")
    if case == "undecodable":
        (data / "7.png").write_bytes(b"\x89PNG not really")
        expected = "7.png is not a decodable image"
    elif case == "sizes":
        Image.fromarray(np.zeros((5, 8, 3), np.uint8)).save(data / "odd.png")
        expected = "images differ in size or mode"
    elif case == "empty":
        expected = "holds no images"
    elif case == "glob":
        data = data / "*.parquet"
        expected = "holds no images"
    elif case == "no-column":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"pixels": [b"x"]}), data / "a.parquet")
        expected = "has no image column (image_png or image; --image-column names another): its columns are pixels"
    elif case == "unlabelled":
        extra = ["--conditional"]
        expected = "--conditional needs labels"
    elif case == "test-empty":
        extra = ["--test-fraction", 0.0001]
        expected = "the test split of"
    elif case == "bucket":
        data = "s3://no-such-bucket/images"
        expected = "S3 bucket 'no-such-bucket' does not exist"
    elif case == "subset":
        extra = ["--subset", 1000]
        expected = "--subset 1000 is more than the"
    # In this process, on the session's cluster: no interpreter or Ray start-up per case.
    proc = run_main("train.py", "--dataset", data, "--batch-size", 8, *extra, "--storage", tmp_path / "runs", "--name", "bad",
                    "--address", ray_cluster.address, env=ray_cluster.env)
    assert expected in one_error_line(proc), proc.stderr[-2000:]
    assert not (tmp_path / "runs").exists(), "a refused run must write nothing"
