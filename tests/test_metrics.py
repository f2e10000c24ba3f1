"""Bundled evaluate metrics (loaded offline from their directories) and continual-learning summaries."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import math

import evaluate
import pytest
import torch

from hf_softmask.evaluation import continual_metrics as C
from hf_softmask.metrics import available_metrics, load_metric, metric_path

# Hand-worked 3-class confusion (rows: reference, cols: prediction):
#            pred0 pred1 pred2
#   ref0       2     1     0
#   ref1       0     1     1
#   ref2       1     0     3
# F1 = 2tp / (2tp + fp + fn): class0 4/6, class1 2/4, class2 6/8.
REFS = [0, 0, 0, 1, 1, 2, 2, 2, 2]
PREDS = [0, 0, 1, 1, 2, 2, 2, 0, 2]


def test_available_and_unknown():
    assert available_metrics() == ["accuracy", "f1"]
    assert (metric_path("f1") / "f1.py").is_file()
    with pytest.raises(ValueError, match="available: accuracy, f1"):
        load_metric("bleu")


def test_accuracy_offline():
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    acc = load_metric("accuracy")
    assert isinstance(acc, evaluate.EvaluationModule)
    assert acc.compute(predictions=PREDS, references=REFS)["accuracy"] == pytest.approx(6 / 9)
    assert acc.compute(predictions=PREDS, references=REFS, normalize=False)["accuracy"] == 6
    w = [1, 1, 1, 1, 1, 1, 1, 3, 1]  # triple weight on the one wrong class-2 example
    assert acc.compute(predictions=PREDS, references=REFS, sample_weight=w)["accuracy"] == pytest.approx(6 / 11)
    # The plain evaluate.load of the directory path works too, and batches accumulate.
    direct = evaluate.load(str(metric_path("accuracy")))
    direct.add_batch(predictions=PREDS[:4], references=REFS[:4])
    direct.add_batch(predictions=PREDS[4:], references=REFS[4:])
    assert direct.compute()["accuracy"] == pytest.approx(6 / 9)


def test_f1_offline():
    f1 = load_metric("f1")
    per_class = [4 / 6, 2 / 4, 6 / 8]
    assert f1.compute(predictions=PREDS, references=REFS, average="macro")["f1"] == pytest.approx(23 / 36)
    assert f1.compute(predictions=PREDS, references=REFS, average="micro")["f1"] == pytest.approx(12 / 18)
    weighted = (3 * per_class[0] + 2 * per_class[1] + 4 * per_class[2]) / 9
    assert f1.compute(predictions=PREDS, references=REFS, average="weighted")["f1"] == pytest.approx(weighted)
    assert list(f1.compute(predictions=PREDS, references=REFS, average=None)["f1"]) == pytest.approx(per_class)
    # labels=[0, 1, 2, 3]: class 3 never occurs and counts as 0 in the macro mean.
    assert f1.compute(predictions=PREDS, references=REFS, average="macro", labels=[0, 1, 2, 3])["f1"] == pytest.approx(
        23 / 48
    )

    refs, preds = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]  # pos 1: tp 2, fp 1, fn 1; pos 0: tp 1, fp 1, fn 1
    assert f1.compute(predictions=preds, references=refs)["f1"] == pytest.approx(2 / 3)
    assert f1.compute(predictions=preds, references=refs, pos_label=0)["f1"] == pytest.approx(1 / 2)
    with pytest.raises(ValueError, match="average='binary' needs two classes"):
        f1.compute(predictions=PREDS, references=REFS)
    with pytest.raises(ValueError, match="average must be one of"):
        f1.compute(predictions=PREDS, references=REFS, average="samples")


# Hand-worked 3-task accuracy matrix; None above the diagonal except where forward transfer is measured.
A = [
    [0.90, 0.55, None],
    [0.95, 0.80, 0.60],
    [0.60, 0.75, 0.85],
]


def test_continual_metrics_accuracy_matrix():
    assert C.average_accuracy(A) == pytest.approx((0.60 + 0.75 + 0.85) / 3)
    # bwt: ((0.60 - 0.90) + (0.75 - 0.80)) / 2
    assert C.backward_transfer(A) == pytest.approx(-0.175)
    # forgetting: task0 best before the end is 0.95 (after task 1): (0.95 - 0.60 + 0.80 - 0.75) / 2
    assert C.forgetting(A) == pytest.approx(0.20)
    # fwt: ((0.55 - 0.5) + (0.60 - 0.5)) / 2
    assert C.forward_transfer(A, [0.5, 0.5, 0.5]) == pytest.approx(0.075)
    missing = [row[:] for row in A]
    missing[0][1] = None
    assert C.forward_transfer(missing, [0.5, 0.5, 0.5]) is None
    s = C.summarize(
        torch.tensor([[0.90, 0.55, math.nan], [0.95, 0.80, 0.60], [0.60, 0.75, 0.85]]), random_init_scores=[0.5] * 3
    )
    assert set(s) == {"acc", "bwt", "fwt", "forgetting"}
    assert s["acc"] == pytest.approx(2.2 / 3) and s["bwt"] == pytest.approx(-0.175)
    assert s["fwt"] == pytest.approx(0.075) and s["forgetting"] == pytest.approx(0.20)
    assert C.summarize(A)["fwt"] is None


def test_continual_metrics_loss_matrix():
    L = [[2.0, None, None], [2.5, 1.8, None], [3.0, 2.0, 1.5]]
    # Forgetting of a loss is its rise above the lowest earlier value: ((3.0 - 2.0) + (2.0 - 1.8)) / 2.
    assert C.forgetting(L, higher_is_better=False) == pytest.approx(0.6)
    assert C.backward_transfer(L, higher_is_better=False) == pytest.approx(-0.6)
    assert C.forgetting(L) == pytest.approx(-0.35)  # read as accuracy, the same matrix would look like improvement
    s = C.summarize(L, higher_is_better=False, random_init_scores=[4.0, 4.0, 4.0])
    assert s["fwt"] is None and s["acc"] == pytest.approx(6.5 / 3)


def test_continual_metrics_edge_cases():
    assert C.summarize([[0.7]]) == {"acc": 0.7, "bwt": 0.0, "fwt": None, "forgetting": 0.0}
    with pytest.raises(ValueError, match="square"):
        C.average_accuracy([[0.1, 0.2]])
    with pytest.raises(ValueError, match="missing entries"):
        C.backward_transfer([[0.9, None], [None, 0.8]])
    with pytest.raises(ValueError, match="random_init_scores"):
        C.forward_transfer(A, [0.5])
