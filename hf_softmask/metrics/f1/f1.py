"""F1 score as an ``evaluate`` metric, shipped with hf_softmask so it loads without the Hub."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "F1 = 2 * precision * recall / (precision + recall), per class and averaged."

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted labels.
    references (list of int): true labels.
    average (str or None): "binary" (F1 of pos_label), "micro" (from pooled counts), "macro" (unweighted
        mean over classes), "weighted" (mean weighted by each class's reference count), or None (per-class array).
    labels (list of int, optional): classes to score and their order; default: sorted union of predictions and \
references.
    pos_label (int): the positive class for average="binary".
    sample_weight (list of float, optional): per-example weights.
Returns:
    f1 (float, or numpy array when average is None). A class with no predicted and no true examples scores 0.
"""

_AVERAGES = ("binary", "micro", "macro", "weighted", None)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class F1(evaluate.Metric):
    """F1 score with binary, micro, macro and weighted averaging."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, labels=None, pos_label=1, average="binary", sample_weight=None):
        if average not in _AVERAGES:
            raise ValueError(f"average must be one of {_AVERAGES}, got {average!r}")
        pred = np.asarray(predictions)
        ref = np.asarray(references)
        weight = (
            np.ones(len(ref), dtype=np.float64)
            if sample_weight is None
            else np.asarray(sample_weight, dtype=np.float64)
        )
        if len(weight) != len(ref):
            raise ValueError(f"sample_weight has {len(weight)} entries for {len(ref)} examples")

        if average == "binary":
            present = np.unique(np.concatenate([pred, ref])).tolist()
            if len(present) > 2:
                raise ValueError(
                    f"average='binary' needs two classes but got labels {present}; "
                    "pass average='macro', 'micro' or 'weighted' for multiclass"
                )
            classes = np.asarray([pos_label])
        elif labels is not None:
            classes = np.asarray(labels)
        else:
            classes = np.unique(np.concatenate([pred, ref]))

        tp = np.array([np.sum(weight * ((pred == c) & (ref == c))) for c in classes], dtype=np.float64)
        fp = np.array([np.sum(weight * ((pred == c) & (ref != c))) for c in classes], dtype=np.float64)
        fn = np.array([np.sum(weight * ((pred != c) & (ref == c))) for c in classes], dtype=np.float64)

        if average == "micro":
            return {"f1": float(_f1(tp.sum(), fp.sum(), fn.sum()))}
        per_class = _f1(tp, fp, fn)
        if average == "binary":
            return {"f1": float(per_class[0])}
        if average is None:
            return {"f1": per_class}
        if average == "macro":
            return {"f1": float(per_class.mean()) if len(per_class) else 0.0}
        support = tp + fn
        return {"f1": float(np.sum(per_class * support) / support.sum()) if support.sum() > 0 else 0.0}


def _f1(tp, fp, fn):
    # 2tp / (2tp + fp + fn) equals the harmonic mean of precision and recall, and is defined (as 0)
    # exactly where a class never occurs in either predictions or references.
    tp, fp, fn = np.asarray(tp, dtype=np.float64), np.asarray(fp, dtype=np.float64), np.asarray(fn, dtype=np.float64)
    denom = 2 * tp + fp + fn
    return np.divide(2 * tp, denom, out=np.zeros_like(denom), where=denom > 0)
