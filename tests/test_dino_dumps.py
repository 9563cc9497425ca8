"""eval_knn.py's feature dumps and DINO's are one format: L2-normalised float features and int64 labels in
trainfeat.pth, testfeat.pth, trainlabels.pth and testlabels.pth. A dump written as DINO writes it loads here and
scores what the model scores; ours holds unit-norm features on which DINO's k-NN rule (the dot product as the
cosine, no normalisation of its own) gives the result we report."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import eval_knn
import vision_transformer as vits
from conftest import ROOT, write_images
from transforms_patch import eval_transform
from utils import read_rgb_image

DINO_CHECKPOINT = ROOT / "tests" / "fixtures" / "dino_main_checkpoint_tiny.pth"
DINO_MODEL = ["--arch", "vit_tiny", "--patch_size", "16", "--embed_dim", "32", "--depth", "1", "--num_heads", "2",
              "--pretrained_weights", str(DINO_CHECKPOINT)]
CLASSES = ("a", "b", "c", "d", "e", "f")
NB_KNN = ["--nb_knn", "1", "3", "10", "20"]
SMALL = ["--resize_size", "32", "--crop_size", "32", "--num_workers", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("knn_data")
    write_images(root / "train", classes=CLASSES, per_class=4, size=(40, 36), seed=3)
    write_images(root / "val", classes=CLASSES, per_class=2, size=(40, 36), seed=4)
    return root


def split_files(folder):
    """``(path, class index)`` of an ImageFolder split, in ImageFolder's order (sorted classes, sorted names)."""
    classes = sorted(path.name for path in folder.iterdir())
    return [(path, index) for index, name in enumerate(classes) for path in sorted((folder / name).iterdir())]


def dino_style_dump(data, model, folder):
    """The four files as DINO's extract_feature_pipeline saves them: CLS features L2-normalised after extraction,
    labels as int64, with torch.save and no record beside them."""
    folder.mkdir()
    transform = eval_transform(32, 32)
    for split, prefix in (("train", "train"), ("val", "test")):
        files = split_files(data / split)
        with torch.no_grad():
            features = model(torch.stack([transform(read_rgb_image(path)) for path, _ in files]))
        torch.save(F.normalize(features, dim=1, p=2), folder / f"{prefix}feat.pth")
        torch.save(torch.tensor([label for _, label in files]).long(), folder / f"{prefix}labels.pth")


def dino_rule_knn(train, train_labels, test, test_labels, k, temperature):
    """Top-1 and top-5 (percent) by DINO's weighted vote, on features taken as they are: a test image's similarity
    to a training image is their dot product; its ``k`` most similar training images each add
    ``exp(similarity / temperature)`` to their class; classes are ranked by their summed votes. A class that got no
    vote is no guess (where ours departs from DINO, whose sort ranks those classes in no defined order)."""
    top1 = top5 = 0
    for query, label in zip(test.double(), test_labels.tolist()):
        similarities = (train.double() @ query).tolist()
        nearest = sorted(range(len(train)), key=lambda index: similarities[index], reverse=True)[:k]
        votes = {}
        for index in nearest:
            votes[int(train_labels[index])] = votes.get(int(train_labels[index]), 0.0) + math.exp(
                similarities[index] / temperature)
        ranked = sorted(votes, key=votes.get, reverse=True)
        top1 += ranked[0] == label
        top5 += label in ranked[:5]
    return 100.0 * top1 / len(test), 100.0 * top5 / len(test)


def test_a_dump_in_dinos_format_scores_what_the_model_scores(data, tmp_path):
    parser = eval_knn.get_args_parser()
    from_model = eval_knn.main(parser.parse_args(DINO_MODEL + ["--data_path", str(data)] + SMALL + NB_KNN))
    args = parser.parse_args(DINO_MODEL + SMALL)
    vits.validate_backbone_args(args)
    dino_style_dump(data, vits.build_frozen_backbone(args, img_size=32), tmp_path / "dino_dump")
    assert not (tmp_path / "dino_dump" / eval_knn.FEATURE_SOURCE).exists()
    from_dump = eval_knn.main(parser.parse_args(["--load_features", str(tmp_path / "dino_dump")] + NB_KNN))
    assert from_dump == from_model
    assert len({result["top1"] for result in from_model.values()}) > 1  # the k values give different results


def test_our_dump_is_normalised_and_dinos_rule_on_it_gives_our_result(data, tmp_path):
    folder = tmp_path / "ours"
    reported = eval_knn.main(eval_knn.get_args_parser().parse_args(
        DINO_MODEL + ["--data_path", str(data), "--dump_features", str(folder)] + SMALL + NB_KNN))
    train, test, train_labels, test_labels = (torch.load(folder / name, weights_only=True)
                                              for name in ("trainfeat.pth", "testfeat.pth", "trainlabels.pth",
                                                           "testlabels.pth"))
    assert train.dtype == test.dtype == torch.float32 and train_labels.dtype == test_labels.dtype == torch.int64
    assert torch.allclose(train.norm(dim=1), torch.ones(len(train)), atol=1e-6)
    assert torch.allclose(test.norm(dim=1), torch.ones(len(test)), atol=1e-6)
    assert json.loads((folder / eval_knn.FEATURE_SOURCE).read_text())["l2_normalised"] is True
    assert train_labels.tolist() == [label for _, label in split_files(data / "train")]
    for k, result in reported.items():
        assert dino_rule_knn(train, train_labels, test, test_labels, k, 0.07) == (result["top1"], result["top5"])
