"""k-NN and linear evaluation: the classifier math, weight loading, and both scripts end to end."""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import eval_knn
import eval_linear
import utils
import vision_transformer as vits
from eval_knn import knn_classifier
from conftest import TINY_BACKBONE_ARGS, write_images

BACKBONE_ARGS = TINY_BACKBONE_ARGS
EVAL_ARGS = BACKBONE_ARGS + ["--resize_size", "16", "--crop_size", "16", "--num_workers", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def dataset_and_checkpoint(tmp_path_factory, trained_checkpoint):
    root = tmp_path_factory.mktemp("eval")
    write_images(root / "data" / "train", classes=("cat", "dog", "owl"), per_class=5, seed=1)
    write_images(root / "data" / "val", classes=("cat", "dog", "owl"), per_class=3, seed=2)
    return root / "data", trained_checkpoint


# ----------------------------------------------------------------------------------------------
# k-NN classifier.
# ----------------------------------------------------------------------------------------------
def test_knn_weights_votes_by_similarity():
    train = torch.tensor([[1.0, 0.0], [0.1, 1.0], [0.12, 1.0], [-1.0, 0.05]])
    labels = torch.tensor([0, 1, 1, 2])
    # The query is almost train[0]: one very similar class-0 neighbour outweighs two weak class-1 ones.
    top1, top5 = knn_classifier(train, labels, torch.tensor([[1.0, 0.02]]), torch.tensor([0]), k=3, T=0.07,
                                num_classes=3)
    assert (top1, top5) == (100.0, 100.0)
    # A query next to the class-1 pair is classified 1 (wrong for label 2); the vote's top 3 holds all classes.
    assert knn_classifier(train, labels, torch.tensor([[0.0, 1.0]]), torch.tensor([2]), k=3, T=0.07,
                          num_classes=3) == (0.0, 100.0)
    # k larger than the training set is clamped.
    assert knn_classifier(train, labels, torch.tensor([[-1.0, 0.0]]), torch.tensor([2]), k=50, T=0.07,
                          num_classes=3)[0] == 100.0


def brute_force_knn(train, train_labels, test, test_labels, k, T, num_classes):
    train, test = F.normalize(train, dim=1), F.normalize(test, dim=1)
    top1 = top5 = 0
    for query, label in zip(test, test_labels):
        similarities = [float(query @ row) for row in train]
        order = sorted(range(len(train)), key=lambda i: -similarities[i])[:k]
        votes = [0.0] * num_classes
        for i in order:
            votes[int(train_labels[i])] += torch.exp(torch.tensor(similarities[i] / T)).item()
        ranked = sorted((c for c in range(num_classes) if votes[c] > 0), key=lambda c: -votes[c])
        top1 += ranked[0] == int(label)
        top5 += int(label) in ranked[:5]
    return 100.0 * top1 / len(test), 100.0 * top5 / len(test)


@pytest.mark.parametrize("k", [1, 5, 20])
def test_knn_matches_brute_force_and_faiss(k):
    generator = torch.Generator().manual_seed(k)
    train, test = torch.randn(200, 16, generator=generator), torch.randn(37, 16, generator=generator)
    train_labels, test_labels = torch.randint(0, 8, (200,), generator=generator), torch.randint(0, 8, (37,), generator=generator)
    expected = brute_force_knn(train, train_labels, test, test_labels, k, 0.07, 8)
    got = knn_classifier(train, train_labels, test, test_labels, k, 0.07, 8, chunk_size=10)
    assert got == pytest.approx(expected)
    assert knn_classifier(train, train_labels, test, test_labels, k, 0.07, 8, use_faiss=True) == pytest.approx(expected)


def test_knn_separates_clusters_with_few_test_images():
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 32, generator=generator) * 5
    train_labels, test_labels = torch.arange(4).repeat(30), torch.arange(4).repeat(2)
    train = centres[train_labels] + torch.randn(120, 32, generator=generator)
    test = centres[test_labels] + torch.randn(8, 32, generator=generator)
    assert knn_classifier(train, train_labels, test, test_labels, 20, 0.07, 4) == (100.0, 100.0)


# ----------------------------------------------------------------------------------------------
# Linear probe.
# ----------------------------------------------------------------------------------------------
class IndexedTensors(TensorDataset):
    def __getitem__(self, index):
        return self.tensors[0][index], index


def test_linear_probe_learns_separable_features():
    torch.manual_seed(0)
    labels = torch.arange(3).repeat(200)
    features = 3 * torch.randn(3, 24)[labels] + torch.randn(600, 24)  # three well separated clusters
    probe = eval_linear.Probe(24, 3, [0.1, 10.0], epochs=15, total_batch=64, device=torch.device("cpu"))
    train_loader = DataLoader(TensorDataset(features[:500], labels[:500]), batch_size=64, shuffle=True)
    val_loader = DataLoader(IndexedTensors(features[500:]), batch_size=64)
    identity = lambda x: x  # noqa: E731
    for epoch in range(15):
        losses = eval_linear.train_one_epoch(probe, train_loader, identity, torch.device("cpu"), epoch)
    results = eval_linear.evaluate(probe, val_loader, identity, labels[500:], torch.device("cpu"))
    assert [r["lr"] for r in results] == [0.1, 10.0]
    assert max(r["top1"] for r in results) > 95.0 and min(losses) < 0.3
    assert probe.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-9)  # cosine reached its end


def test_frozen_features_layout():
    model = vits.vit_tiny(patch_size=4, embed_dim=32, depth=3, num_heads=2).eval()
    images = torch.randn(2, 3, 16, 16)
    blocks = model.get_intermediate_layers(images, 2)
    features = eval_linear.frozen_features(model, images, 2, avgpool_patchtokens=True)
    assert features.shape == (2, 3 * 32)
    torch.testing.assert_close(features, torch.cat([blocks[0][:, 0], blocks[1][:, 0], blocks[1][:, 1:].mean(1)], 1))


# ----------------------------------------------------------------------------------------------
# Weight loading.
# ----------------------------------------------------------------------------------------------
def tiny_backbone():
    return vits.vit_tiny(patch_size=4, embed_dim=32, depth=1, num_heads=2, img_size=16)


def test_weights_load_from_every_layout(tmp_path, dataset_and_checkpoint):
    _, checkpoint_path = dataset_and_checkpoint
    checkpoint = torch.load(checkpoint_path, weights_only=True)
    teacher = {k[len("backbone."):]: v for k, v in checkpoint["teacher"].items() if k.startswith("backbone.")}
    layouts = {
        "ours.pth": checkpoint,
        "dino_full.pth": {"teacher": {f"module.{k}": v for k, v in checkpoint["teacher"].items()}},
        "backbone_only.pth": teacher,
        "timm.pth": {**teacher, "head.weight": torch.zeros(10, 32), "head.bias": torch.zeros(10)},
    }
    for name, content in layouts.items():
        torch.save(content, tmp_path / name)
        model = tiny_backbone()
        vits.load_pretrained_weights(model, str(tmp_path / name))
        assert all(torch.equal(model.state_dict()[k], v) for k, v in teacher.items()), name
    student = tiny_backbone()
    vits.load_pretrained_weights(student, str(tmp_path / "ours.pth"), checkpoint_key="student")
    assert torch.equal(student.pos_embed, checkpoint["student"]["backbone.pos_embed"])


def test_position_embeddings_keep_the_grid_of_the_weights(tmp_path, dataset_and_checkpoint):
    _, checkpoint_path = dataset_and_checkpoint
    model = vits.vit_tiny(patch_size=4, embed_dim=32, depth=1, num_heads=2, img_size=32)  # 8x8 grid, file has 4x4
    vits.load_pretrained_weights(model, str(checkpoint_path))
    assert model.pos_embed.shape == (1, 17, 32)  # resampled at forward time only, as DINO does


def test_wrong_arch_or_missing_weights_are_named(tmp_path, dataset_and_checkpoint):
    data, checkpoint_path = dataset_and_checkpoint
    wrong = BACKBONE_ARGS[:-6] + ["--embed_dim", "48", "--depth", "1", "--num_heads", "2"]
    args = eval_knn.get_args_parser().parse_args(
        wrong + EVAL_ARGS[len(BACKBONE_ARGS):] + ["--data_path", str(data), "--pretrained_weights", str(checkpoint_path)])
    with pytest.raises(ValueError, match=r"--embed_dim 48 contradicts the weights' 32 \(.*checkpoint.pth, from its "
                                         r"patch embedding patch_embed.proj.weight\): drop --embed_dim or give 32"):
        eval_knn.main(args)
    wider = vits.vit_tiny(patch_size=4, embed_dim=48, depth=1, num_heads=2, img_size=16)
    with pytest.raises(RuntimeError, match=r"do not fit this backbone.*\n.*missing keys \(0\).*\n.*unexpected keys "
                                           r"\(0\).*\n.*shape mismatches \(18\): blocks\.0\.attn"):
        vits.load_pretrained_weights(wider, str(checkpoint_path))
    deeper = vits.vit_tiny(patch_size=4, embed_dim=32, depth=2, num_heads=2, img_size=16)
    with pytest.raises(RuntimeError, match=r"missing keys \(12\): blocks\.1\."):
        vits.load_pretrained_weights(deeper, str(checkpoint_path))
    args = eval_knn.get_args_parser().parse_args(EVAL_ARGS + ["--data_path", str(data)])
    with pytest.raises(ValueError, match="--pretrained_weights PATH or --random_init"):
        eval_knn.main(args)
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(RuntimeError, match="cannot read weights .*junk.pth"):
        vits.load_pretrained_weights(tiny_backbone(), str(tmp_path / "junk.pth"))
    torch.save({"model": {}, "other": {}}, tmp_path / "keys.pth")
    with pytest.raises(ValueError, match="no .teacher. weights.*--checkpoint_key"):
        vits.load_pretrained_weights(tiny_backbone(), str(tmp_path / "keys.pth"))


# ----------------------------------------------------------------------------------------------
# Scripts end to end.
# ----------------------------------------------------------------------------------------------
def final_line(output: str) -> dict:
    return json.loads([line for line in output.splitlines() if line.startswith("FINAL ")][-1][len("FINAL "):])


def test_knn_script_with_trained_and_random_weights(dataset_and_checkpoint, tmp_path, capsys):
    data, checkpoint_path = dataset_and_checkpoint
    common = EVAL_ARGS + ["--data_path", str(data), "--nb_knn", "1", "3", "50"]
    parser = eval_knn.get_args_parser()
    trained = eval_knn.main(parser.parse_args(common + ["--pretrained_weights", str(checkpoint_path),
                                                        "--dump_features", str(tmp_path / "features")]))
    assert final_line(capsys.readouterr().out)["results"]["3"] == trained[3]
    reloaded = eval_knn.main(parser.parse_args(["--load_features", str(tmp_path / "features"), "--nb_knn", "1", "3", "50"]))
    assert reloaded == trained
    assert eval_knn.main(parser.parse_args(common + ["--use_faiss", "--load_features", str(tmp_path / "features")])) == trained
    random = eval_knn.main(parser.parse_args(common + ["--random_init"]))
    assert set(random) == {1, 3, 15} and all(0 <= r["top1"] <= 100 for r in random.values())  # 15 train images
    assert final_line(capsys.readouterr().out)["weights"] == "random_init"


def test_val_split_picks_the_evaluated_folder(dataset_and_checkpoint, tmp_path):
    data, _ = dataset_and_checkpoint
    holdout = tmp_path / "data"
    shutil.copytree(data / "train", holdout / "train")
    write_images(holdout / "holdout", classes=("cat", "dog", "owl"), per_class=1, seed=3)
    common = EVAL_ARGS + ["--random_init", "--nb_knn", "1"]
    parser = eval_knn.get_args_parser()
    result = eval_knn.main(parser.parse_args(common + ["--data_path", str(holdout), "--val_split", "holdout"]))
    assert result[1]["top1"] in (0.0, 100 / 3, 200 / 3, 100.0)  # three holdout images were classified
    with pytest.raises(FileNotFoundError, match=r"holdout.*prepare_data.py --holdout"):
        eval_knn.main(parser.parse_args(common + ["--data_path", str(data), "--val_split", "holdout"]))


def test_linear_script_trains_resumes_and_evaluates(dataset_and_checkpoint, tmp_path, capsys):
    data, checkpoint_path = dataset_and_checkpoint
    common = EVAL_ARGS + ["--data_path", str(data), "--pretrained_weights", str(checkpoint_path),
                          "--n_last_blocks", "1", "--avgpool_patchtokens", "true", "--batch_size_per_gpu", "4",
                          "--lrs", "0.01", "0.1", "--output_dir", str(tmp_path / "linear")]
    parser = eval_linear.get_args_parser()
    first = eval_linear.main(parser.parse_args(common + ["--epochs", "2"]))
    best = eval_linear.main(parser.parse_args(common + ["--epochs", "2"]))  # resumes at epoch 2: nothing left
    log = [json.loads(line) for line in (tmp_path / "linear" / "log.txt").read_text().splitlines()]
    assert [line["epoch"] for line in log] == [0, 1] and set(log[1]["train_loss"]) == {"0.01", "0.1"}
    assert "Resumed linear heads" in capsys.readouterr().out and best == first
    with pytest.raises(ValueError, match=r"--epochs 2 there, 3 now"):  # another schedule is another run
        eval_linear.main(parser.parse_args(common + ["--epochs", "3"]))
    evaluated = eval_linear.main(parser.parse_args(common + ["--epochs", "2", "--evaluate"]))
    assert evaluated["lr"] in (0.01, 0.1) and 0 <= evaluated["top1"] <= 100 and best["top1"] >= evaluated["top1"]
    assert final_line(capsys.readouterr().out)["eval"] == "linear"
    with pytest.raises(ValueError, match=r"--lrs \[0\.01, 0\.1\] there, \[0\.5\] now"):
        eval_linear.main(parser.parse_args(common[:-5] + ["--lrs", "0.5", "--output_dir", str(tmp_path / "linear"),
                                                          "--epochs", "2"]))
    random = eval_linear.main(eval_linear.get_args_parser().parse_args(
        EVAL_ARGS + ["--data_path", str(data), "--random_init", "--n_last_blocks", "1", "--epochs", "1",
                     "--output_dir", str(tmp_path / "linear_random")]))
    assert 0 <= random["top1"] <= 100


def test_knn_under_torchrun_matches_one_process(dataset_and_checkpoint, tmp_path, root):
    data, checkpoint_path = dataset_and_checkpoint
    args = EVAL_ARGS + ["--data_path", str(data), "--pretrained_weights", str(checkpoint_path), "--nb_knn", "1", "3"]
    single = eval_knn.main(eval_knn.get_args_parser().parse_args(args))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(root / "eval_knn.py"), *args], env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    distributed = final_line(result.stdout)["results"]
    assert {int(k): v for k, v in distributed.items()} == single


def test_random_init_baseline_is_reproducible():
    args = eval_knn.get_args_parser().parse_args(EVAL_ARGS + ["--random_init"])
    first, second = vits.build_frozen_backbone(args, 16), vits.build_frozen_backbone(args, 16)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))


# ----------------------------------------------------------------------------------------------
# Weights that must be refused or read (docs/troubleshooting.md).
# ----------------------------------------------------------------------------------------------
def diverged_copy(checkpoint_path, folder) -> str:
    """A copy of a training checkpoint whose teacher holds a NaN and an infinity, as ``folder/checkpoint.pth``."""
    checkpoint = torch.load(checkpoint_path, weights_only=True)
    checkpoint["teacher"]["backbone.blocks.0.attn.qkv.weight"][0, 0] = float("nan")
    checkpoint["teacher"]["backbone.norm.bias"][0] = float("inf")
    folder.mkdir()
    torch.save(checkpoint, folder / "checkpoint.pth")
    return str(folder / "checkpoint.pth")


DIVERGED = (r"weights in .*checkpoint.pth are not finite: tensor blocks.0.attn.qkv.weight holds NaN or infinity; "
            r"this is a training checkpoint \(epoch 1\): the training run diverged")


def test_non_finite_weights_are_refused_by_knn_and_linear(dataset_and_checkpoint, tmp_path):
    data, checkpoint_path = dataset_and_checkpoint
    weights = diverged_copy(checkpoint_path, tmp_path / "run")
    with pytest.raises(RuntimeError, match=DIVERGED):
        eval_knn.main(eval_knn.get_args_parser().parse_args(
            EVAL_ARGS + ["--data_path", str(data), "--pretrained_weights", weights]))
    linear = EVAL_ARGS + ["--data_path", str(data), "--pretrained_weights", weights, "--n_last_blocks", "1",
                          "--epochs", "1", "--output_dir", str(tmp_path / "linear")]
    for extra in ([], ["--evaluate"]):
        with pytest.raises(RuntimeError, match=DIVERGED):
            eval_linear.main(eval_linear.get_args_parser().parse_args(linear + extra))
    assert not (tmp_path / "linear" / eval_linear.CHECKPOINT_NAME).exists()


class DinoWrapper(torch.nn.Module):
    """DINO's ``MultiCropWrapper`` as its state dict sees it: ``backbone.*`` and ``head.*``."""

    def __init__(self):
        super().__init__()
        self.backbone = vits.vit_tiny(patch_size=4, embed_dim=32, depth=1, num_heads=2, img_size=16)
        self.head = vits.DINOHead(32, 64, hidden_dim=64, bottleneck_dim=32)


def write_dino_checkpoint(path) -> argparse.Namespace:
    """A checkpoint laid out as DINO's main_dino.py writes it: the student under DDP (``module.``), the
    teacher without, the AdamW state, the loss center, the fp16 scaler, and the arguments as a Namespace."""
    parser = argparse.ArgumentParser("DINO")
    parser.add_argument("--arch", default="vit_small")
    parser.add_argument("--patch_size", default=16, type=int)
    parser.add_argument("--global_crops_scale", type=float, nargs="+", default=(0.4, 1.0))
    parser.add_argument("--use_fp16", type=utils.bool_flag, default=True)
    args = parser.parse_args(["--arch", "vit_tiny", "--patch_size", "4"])
    args.rank, args.world_size, args.gpu, args.dist_url = 0, 1, 0, "env://"  # set by DINO at run time
    student, teacher = torch.nn.Module(), DinoWrapper()
    student.module = DinoWrapper()
    teacher.load_state_dict(student.module.state_dict())
    optimizer = torch.optim.AdamW(utils.get_params_groups(student))
    student.module.head(student.module.backbone(torch.randn(2, 3, 16, 16))).sum().backward()
    optimizer.step()
    torch.save({"student": student.state_dict(), "teacher": teacher.state_dict(), "optimizer": optimizer.state_dict(),
                "epoch": 3, "args": args, "dino_loss": {"center": torch.zeros(1, 64)},
                "fp16_scaler": torch.amp.GradScaler("cpu").state_dict()}, path)
    return args


def test_official_dino_checkpoint_is_read_safely(dataset_and_checkpoint, tmp_path, capsys):
    data, _ = dataset_and_checkpoint
    dino_args = write_dino_checkpoint(tmp_path / "checkpoint.pth")
    checkpoint = utils.load_checkpoint(tmp_path / "checkpoint.pth")
    assert checkpoint["args"] == vars(dino_args) and checkpoint["epoch"] == 3  # the Namespace, as a plain dict
    assert {"student", "teacher", "optimizer", "dino_loss", "fp16_scaler"} < set(checkpoint)
    common = EVAL_ARGS + ["--data_path", str(data), "--pretrained_weights", str(tmp_path / "checkpoint.pth"),
                          "--nb_knn", "3"]
    results = eval_knn.main(eval_knn.get_args_parser().parse_args(common + ["--checkpoint_key", "teacher"]))
    loaded = f"Loaded {len(DinoWrapper().backbone.state_dict())} backbone tensors"
    assert loaded in capsys.readouterr().out and 0 <= results[3]["top1"] <= 100
    for key, prefix in (("teacher", "backbone."), ("student", "module.backbone.")):
        model = vits.build_frozen_backbone(eval_knn.get_args_parser().parse_args(common + ["--checkpoint_key", key]),
                                           img_size=16)
        assert all(torch.equal(value, checkpoint[key][prefix + name]) for name, value in model.state_dict().items())


def test_knn_k_above_the_training_set_is_reported_as_used(tmp_path, capsys):
    generator = torch.Generator().manual_seed(0)
    tensors = (torch.randn(12, 8, generator=generator), torch.randn(5, 8, generator=generator),
               torch.arange(12) % 3, torch.arange(5) % 3)
    (tmp_path / "features").mkdir()
    for tensor, name in zip(tensors, eval_knn.FEATURE_FILES):
        torch.save(tensor, tmp_path / "features" / name)
    results = eval_knn.main(eval_knn.get_args_parser().parse_args(
        ["--load_features", str(tmp_path / "features"), "--nb_knn", "3", "20", "200"]))
    printed = capsys.readouterr().out
    assert set(results) == {3, 12} and set(final_line(printed)["results"]) == {"3", "12"}
    assert "warning: --nb_knn 20 is more than the 12 training images; evaluating and reporting it as 12-NN" in printed
    assert "--nb_knn 200 is more than" in printed and "12-NN classifier result" in printed
    assert "20-NN" not in printed.replace("--nb_knn 20 ", "")


# The child process runs eval_linear and SIGKILLs itself around its second checkpoint commit.
LINEAR_KILLER = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
import eval_linear

replace, commits = os.replace, []

def dying_replace(source, destination):
    killed_after = os.environ["KILL"] == "after_commit"
    if os.path.basename(destination) == eval_linear.CHECKPOINT_NAME:
        commits.append(destination)
        if len(commits) == 2 and not killed_after:
            os.kill(os.getpid(), signal.SIGKILL)
    replace(source, destination)
    if len(commits) == 2 and killed_after:
        os.kill(os.getpid(), signal.SIGKILL)

os.replace = dying_replace
eval_linear.main(eval_linear.get_args_parser().parse_args(sys.argv[2:]))
"""


@pytest.mark.parametrize("kill", ["before_commit", "after_commit"])
def test_linear_killed_around_its_checkpoint_loses_no_log_line(dataset_and_checkpoint, tmp_path, root, capsys, kill):
    data, _ = dataset_and_checkpoint
    output = tmp_path / "linear"
    argv = EVAL_ARGS + ["--data_path", str(data), "--random_init", "--n_last_blocks", "1", "--epochs", "2",
                        "--batch_size_per_gpu", "8", "--output_dir", str(output)]
    env = {**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1", "KILL": kill}
    result = subprocess.run([sys.executable, "-c", LINEAR_KILLER, str(root), *argv], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stdout[-3000:] + result.stderr[-3000:]
    logged = [json.loads(line)["epoch"] for line in (output / "log.txt").read_text().splitlines()]
    assert logged == [0, 1]  # epoch 1 was logged before its checkpoint, whichever side of the commit the kill fell
    committed = utils.load_checkpoint(output / eval_linear.CHECKPOINT_NAME)["epoch"]
    assert committed == (2 if kill == "after_commit" else 1)
    with open(output / "log.txt", "a") as log:
        log.write('{"epoch": 1, "train_lo')  # and a line torn by the kill
    capsys.readouterr()
    best = eval_linear.main(eval_linear.get_args_parser().parse_args(argv))
    printed = capsys.readouterr().out
    assert [json.loads(line)["epoch"] for line in (output / "log.txt").read_text().splitlines()] == [0, 1]
    assert f"Dropped {3 - committed} line(s)" in printed and 0 <= best["top1"] <= 100
    assert not list(output.glob(".*.tmp.*"))  # a temporary left by the kill is removed


def test_evaluations_list_class_folders_by_the_project_rule_and_check_backbone_args(tmp_path):
    write_images(tmp_path / "train", classes=("cat", "dog", ".ipynb_checkpoints"), per_class=2)
    split = eval_knn.build_split(tmp_path, "train", None, eval_knn.IndexedImageFolder)
    assert split.classes == ["cat", "dog"] and len(split) == 4  # torchvision's ImageFolder: 3 classes
    for script in (eval_knn, eval_linear):
        parser = script.get_args_parser()
        args = parser.parse_args(EVAL_ARGS + ["--data_path", str(tmp_path), "--patch_size", "0"])
        with pytest.raises(ValueError, match="--patch_size must be positive, got 0"):
            script.validate_args(args)
        args = parser.parse_args(EVAL_ARGS + ["--data_path", str(tmp_path), "--embed_dim", "33"])
        with pytest.raises(ValueError, match="--embed_dim 33 is not a multiple of --num_heads 2"):
            script.validate_args(args)


def test_building_a_backbone_names_impossible_sizes():
    parser = argparse.ArgumentParser()
    vits.add_backbone_args(parser)
    with pytest.raises(ValueError, match=r"--patch_size must be positive, got 0\n.*--embed_dim 33 is not a multiple "
                                         r"of --num_heads 6 \(vit_small's default\)"):
        vits.build_backbone(parser.parse_args(["--patch_size", "0", "--embed_dim", "33"]))
