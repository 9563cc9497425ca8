"""prepare_data.py on miniature Fashion-MNIST (IDX) and CIFAR (python archive) files made here."""
import gzip
import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
from PIL import Image

import prepare_data
from conftest import ROOT, write_mini_fashion_mnist


@pytest.fixture
def mini_fashion_mnist(tmp_path):
    return write_mini_fashion_mnist(tmp_path / "fmnist", train=30, test=12)


def parse(*argv):
    return prepare_data.get_args_parser().parse_args(list(argv))


def test_fashion_mnist_to_image_folders(mini_fashion_mnist, tmp_path):
    out = tmp_path / "out"
    counts = prepare_data.main(parse("--dataset", "fashion_mnist", "--source", str(mini_fashion_mnist),
                                     "--output_dir", str(out), "--limit_per_class", "2"))
    assert counts == {"train": 20, "val": 12}
    assert sorted(p.name for p in (out / "train").iterdir()) == sorted(prepare_data.FASHION_MNIST_CLASSES)
    first = out / "train" / "tshirt_top" / "00000.png"
    with gzip.open(mini_fashion_mnist / "train-images-idx3-ubyte.gz") as handle:
        expected = np.frombuffer(handle.read()[16:16 + 784], dtype=np.uint8).reshape(28, 28)
    assert np.array_equal(np.asarray(Image.open(first)), expected)
    assert len(list((out / "val" / "bag").iterdir())) == 1  # labels 8 of 12 test images


def cifar_batch(rng, count, label_key, num_classes):
    return {b"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
            label_key: list(np.arange(count) % num_classes)}


def write_tar_member(archive, name, obj):
    data = pickle.dumps(obj)
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_cifar_archive_to_image_folders(tmp_path, dataset):
    rng = np.random.default_rng(1)
    archive_name, folder = prepare_data.CIFAR_ARCHIVES[dataset]
    path = tmp_path / archive_name
    with tarfile.open(path, "w:gz") as archive:
        if dataset == "cifar10":
            for i in range(1, 6):
                write_tar_member(archive, f"{folder}/data_batch_{i}", cifar_batch(rng, 4, b"labels", 10))
            write_tar_member(archive, f"{folder}/test_batch", cifar_batch(rng, 10, b"labels", 10))
            write_tar_member(archive, f"{folder}/batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)]})
        else:
            write_tar_member(archive, f"{folder}/train", cifar_batch(rng, 40, b"fine_labels", 100))
            write_tar_member(archive, f"{folder}/test", cifar_batch(rng, 10, b"fine_labels", 100))
            write_tar_member(archive, f"{folder}/meta", {b"fine_label_names": [f"f{i}".encode() for i in range(100)]})
    out = tmp_path / "out"
    counts = prepare_data.main(parse("--dataset", dataset, "--source", str(path), "--output_dir", str(out)))
    assert counts == ({"train": 20, "val": 10} if dataset == "cifar10" else {"train": 40, "val": 10})
    first = next((out / "train" / ("c0" if dataset == "cifar10" else "f0")).iterdir())
    image = np.asarray(Image.open(first))
    assert image.shape == (32, 32, 3)
    # The first training image: channel-planar bytes -> height x width x RGB.
    with tarfile.open(path) as archive:
        member = "data_batch_1" if dataset == "cifar10" else "train"
        raw = pickle.loads(archive.extractfile(f"{folder}/{member}").read(), encoding="bytes")[b"data"][0]
    assert np.array_equal(np.asarray(Image.open(out / "train" / first.parent.name / "00000.png")),
                          raw.reshape(3, 32, 32).transpose(1, 2, 0))


def test_missing_sources_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        prepare_data.main(parse("--dataset", "fashion_mnist", "--source", str(tmp_path / "none"),
                                "--output_dir", str(tmp_path / "out")))
    with pytest.raises(FileNotFoundError, match="cifar-100-python.tar.gz"):
        prepare_data.main(parse("--dataset", "cifar100", "--source", str(tmp_path / "none.tar.gz"),
                                "--output_dir", str(tmp_path / "out")))
    with pytest.raises(ValueError, match="--limit_per_class"):
        prepare_data.main(parse("--dataset", "cifar10", "--output_dir", str(tmp_path), "--limit_per_class", "0"))


def test_holdout_is_carved_from_train_and_reruns_rewrite_exactly(mini_fashion_mnist, tmp_path):
    out = tmp_path / "out"
    common = ("--dataset", "fashion_mnist", "--source", str(mini_fashion_mnist), "--output_dir", str(out))
    before = prepare_data.main(parse(*common, "--limit_per_class", "1"))
    train_before = sorted(p.relative_to(out / "train") for p in (out / "train").rglob("*.png"))
    counts = prepare_data.main(parse(*common, "--limit_per_class", "1", "--holdout", "2"))
    assert before == {"train": 10, "val": 10} and counts == {"train": 10, "val": 10, "holdout": 20}
    train = {p.relative_to(out / "train") for p in (out / "train").rglob("*.png")}
    holdout = {p.relative_to(out / "holdout") for p in (out / "holdout").rglob("*.png")}
    assert sorted(train) == train_before and not train & holdout  # train unchanged, disjoint from holdout
    assert sorted(p.name for p in (out / "holdout" / "tshirt_top").iterdir()) == ["00010.png", "00020.png"]
    prepare_data.main(parse(*common))  # a rerun without limit or holdout: exactly the full splits again
    assert not (out / "holdout").exists() and len(list((out / "train").rglob("*.png"))) == 30


def test_holdout_errors_and_foreign_folders(mini_fashion_mnist, tmp_path):
    common = ("--dataset", "fashion_mnist", "--source", str(mini_fashion_mnist))
    with pytest.raises(ValueError, match="--holdout 3 leaves no training images"):
        prepare_data.main(parse(*common, "--output_dir", str(tmp_path / "a"), "--holdout", "3"))
    foreign = tmp_path / "mine"
    (foreign / "train").mkdir(parents=True)
    (foreign / "train" / "keep.png").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="not written by prepare_data.py"):
        prepare_data.main(parse(*common, "--output_dir", str(foreign)))
    assert (foreign / "train" / "keep.png").read_bytes() == b"x"


def test_rerun_with_a_smaller_limit_leaves_exactly_the_new_selection(mini_fashion_mnist, tmp_path):
    common = ("--dataset", "fashion_mnist", "--source", str(mini_fashion_mnist), "--output_dir", str(tmp_path))
    prepare_data.main(parse(*common, "--limit_per_class", "3"))
    counts = prepare_data.main(parse(*common, "--limit_per_class", "1"))
    on_disk = {split: len(list((tmp_path / split).rglob("*.png"))) for split in ("train", "val")}
    assert counts == on_disk == {"train": 10, "val": 10}


def test_a_run_killed_mid_write_is_marked_incomplete_and_written_again(tmp_path, capsys):
    source, out = write_mini_fashion_mnist(tmp_path / "fmnist", train=4000, test=10), tmp_path / "out"
    command = [sys.executable, "prepare_data.py", "--dataset", "fashion_mnist", "--source", str(source),
               "--output_dir", str(out)]
    process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while len(list(out.glob("train/*/*.png"))) < 20:  # well into the 4000 training images
            assert process.poll() is None and time.monotonic() < deadline, "prepare_data.py ended before the kill"
            time.sleep(0.01)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert json.loads((out / prepare_data.MARKER).read_text())["complete"] is False
    capsys.readouterr()
    counts = prepare_data.main(parse(*command[2:]))
    assert "left incomplete by an interrupted prepare_data.py run; writing it again" in capsys.readouterr().out
    record = json.loads((out / prepare_data.MARKER).read_text())
    assert record["complete"] is True and record["written"] == counts == {"train": 4000, "val": 10}
    assert {split: len(list(out.glob(f"{split}/*/*.png"))) for split in counts} == counts


def test_symlinked_splits_and_unwritable_output_dirs_are_refused_first(mini_fashion_mnist, tmp_path):
    common = ("--dataset", "fashion_mnist", "--source", str(mini_fashion_mnist), "--limit_per_class", "1")
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    prepare_data.main(parse(*common, "--output_dir", str(out)))
    elsewhere.mkdir()
    (elsewhere / "keep.png").write_bytes(b"mine")
    shutil.rmtree(out / "train")
    (out / "train").symlink_to(elsewhere)
    with pytest.raises(FileExistsError, match=rf"{out / 'train'} is a symbolic link to {elsewhere}: .*would write "
                                              r"through a link.*Remove it .*nothing was changed"):
        prepare_data.main(parse(*common, "--output_dir", str(out)))
    assert [path.name for path in elsewhere.iterdir()] == ["keep.png"] and (out / "val").is_dir()
    (tmp_path / "a_file").write_text("")
    for output_dir in (tmp_path / "a_file", tmp_path / "a_file" / "out"):  # refused before reading the source
        with pytest.raises(NotADirectoryError, match=rf"--output_dir {output_dir} cannot be a folder: .*a_file is "
                                                     "a file"):
            prepare_data.main(parse("--dataset", "fashion_mnist", "--source", str(tmp_path / "missing"),
                                    "--output_dir", str(output_dir)))


# ----------------------------------------------------------------------------------------------
# Damaged and foreign sources.
# ----------------------------------------------------------------------------------------------
def write_cifar10_archive(path):
    rng = np.random.default_rng(2)
    folder = prepare_data.CIFAR_ARCHIVES["cifar10"][1]
    with tarfile.open(path, "w:gz") as archive:
        for i in range(1, 6):
            write_tar_member(archive, f"{folder}/data_batch_{i}", cifar_batch(rng, 40, b"labels", 10))
        write_tar_member(archive, f"{folder}/test_batch", cifar_batch(rng, 10, b"labels", 10))
        write_tar_member(archive, f"{folder}/batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)]})
    return path


def test_damaged_fashion_mnist_files_are_named_with_the_fix(mini_fashion_mnist, tmp_path):
    common = ("--dataset", "fashion_mnist", "--source", str(mini_fashion_mnist), "--output_dir", str(tmp_path / "o"))
    images = mini_fashion_mnist / "train-images-idx3-ubyte.gz"
    whole = images.read_bytes()
    images.write_bytes(whole[:len(whole) // 2])  # an interrupted download
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.gz is not a complete gzip file \(EOFError.*"
                                         r"truncated or corrupt.*download it again"):
        prepare_data.main(parse(*common))
    images.write_bytes(b"<html>404 not found</html>")
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.gz is not a complete gzip file \(BadGzipFile"):
        prepare_data.main(parse(*common))
    with gzip.open(images, "wb") as handle:  # a whole gzip file holding a cut IDX file
        handle.write(gzip.decompress(whole)[:1000])
    with pytest.raises(ValueError, match=r"holds 984 bytes of data where its header announces 30 x 28 x 28"):
        prepare_data.main(parse(*common))
    images.write_bytes(whole)
    (mini_fashion_mnist / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"t10k-labels-idx1-ubyte.gz not found: --source .* must hold"):
        prepare_data.main(parse(*common))
    assert not (tmp_path / "o").exists()  # nothing written before the source was read whole


def test_fake_or_truncated_cifar_archives_are_named_with_the_fix(tmp_path):
    path = tmp_path / "cifar-10-python.tar.gz"
    common = ("--dataset", "cifar10", "--source", str(path), "--output_dir", str(tmp_path / "o"))
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError, match=r"cifar-10-python.tar.gz is not a .tar.gz archive \(ReadError.*"
                                         r"download it again, or point --source at an intact copy"):
        prepare_data.main(parse(*common))
    whole = write_cifar10_archive(tmp_path / "whole.tar.gz").read_bytes()
    path.write_bytes(whole[:len(whole) // 2])
    with pytest.raises(ValueError, match=r"cifar-10-python.tar.gz (cannot be read to the end|has no) .*"
                                         r"truncated or corrupt"):
        prepare_data.main(parse(*common))
    with pytest.raises(ValueError, match=r"whole.tar.gz has no cifar-100-python/train .*another --dataset"):
        prepare_data.main(parse("--dataset", "cifar100", "--source", str(tmp_path / "whole.tar.gz"),
                                "--output_dir", str(tmp_path / "o")))
    folder = tmp_path / "extracted" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    (folder / "data_batch_1").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"data_batch_1 is not a CIFAR python batch \(UnpicklingError"):
        prepare_data.main(parse("--dataset", "cifar10", "--source", str(folder.parent), "--output_dir", str(tmp_path)))


# ----------------------------------------------------------------------------------------------
# Multi-garment scenes.
# ----------------------------------------------------------------------------------------------
def test_scene_masks_follow_the_pasted_garments_later_on_top():
    first = np.full((28, 28), 200, np.uint8)
    second = np.zeros((28, 28), np.uint8)
    second[:, 14:] = 100  # only its right half is garment
    second[0, 14:] = 5  # a faint row: covered, but too dark to see against the background
    canvas, labels = prepare_data.render_scene([(first, 3, 28, 0, 0), (second, 7, 28, 10, 10)], 48)
    assert labels[5, 5] == 4 and canvas[5, 5] == 200  # first garment alone: class 3 + 1
    assert labels[20, 30] == 8 and canvas[20, 30] == 100  # the second covers the first there
    assert labels[20, 15] == 4 and canvas[20, 15] == 200  # the second's empty left half leaves the first visible
    assert labels[10, 30] == prepare_data.IGNORE_LABEL and canvas[10, 30] == 5
    assert labels[45, 45] == 0 and canvas[45, 45] == 0
    garment = canvas > 0
    assert np.array_equal(labels > 0, garment)  # every covered pixel is labelled or ignored, the rest background


def test_scene_set_is_a_voc_layout_from_disjoint_garments_and_deterministic(mini_fashion_mnist, tmp_path):
    import segmentation_data

    common = ("--dataset", "fashion_mnist_scenes", "--source", str(mini_fashion_mnist), "--scenes", "5", "2", "3",
              "--canvas_size", "32", "--garments", "1", "3", "--garment_size", "8", "16")
    counts = prepare_data.main(parse(*common, "--output_dir", str(tmp_path / "a")))
    assert counts == {"train": 5, "holdout": 2, "val": 3}
    layout = segmentation_data.resolve_layout(tmp_path / "a", "voc")
    assert layout.num_classes == 11 and layout.class_names[:2] == ("background", "tshirt_top")
    for split, count in counts.items():
        samples = segmentation_data.list_samples(layout, split)
        assert len(samples) == count == len(list((tmp_path / "a" / split).glob("*.png")))
        for sample in samples:
            labels = segmentation_data.read_labels(sample.mask, layout)
            canvas = np.asarray(Image.open(sample.image))
            assert np.array_equal(labels == 0, canvas == 0)
    prepare_data.main(parse(*common, "--output_dir", str(tmp_path / "b")))
    for path in (tmp_path / "a" / "VOC2012").rglob("*.png"):
        assert path.read_bytes() == (tmp_path / "b" / path.relative_to(tmp_path / "a")).read_bytes()
    pools = prepare_data.scene_pools({"train": (np.zeros(30), np.zeros(30)), "val": (np.zeros(12), np.zeros(12))},
                                     holdout=2)
    assert not set(pools["train"][1]) & set(pools["holdout"][1]) and pools["val"][0] == "val"


def test_scene_arguments_are_checked(mini_fashion_mnist, tmp_path):
    common = ("--dataset", "fashion_mnist_scenes", "--source", str(mini_fashion_mnist), "--output_dir", str(tmp_path))
    with pytest.raises(ValueError, match="--garment_size 8 40 must satisfy"):
        prepare_data.main(parse(*common, "--canvas_size", "32", "--garment_size", "8", "40"))
    with pytest.raises(ValueError, match="give\n?.*--scenes TRAIN HOLDOUT VAL"):
        prepare_data.main(parse(*common, "--holdout", "3"))
