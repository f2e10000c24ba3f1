"""Accuracy as an ``evaluate`` metric, shipped with hf_softmask so it loads without the Hub."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Fraction of predictions equal to their references (optionally weighted)."

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted labels.
    references (list of int): true labels.
    normalize (bool): if False, return the (weighted) count of correct predictions instead of the fraction.
    sample_weight (list of float, optional): per-example weights.
Returns:
    accuracy (float)
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    """Fraction of correct predictions."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        pred = np.asarray(predictions)
        ref = np.asarray(references)
        weight = (
            np.ones(len(ref), dtype=np.float64)
            if sample_weight is None
            else np.asarray(sample_weight, dtype=np.float64)
        )
        if len(weight) != len(ref):
            raise ValueError(f"sample_weight has {len(weight)} entries for {len(ref)} examples")
        correct = float(np.sum(weight * (pred == ref)))
        if not normalize:
            return {"accuracy": correct}
        total = float(np.sum(weight))
        # An empty evaluation set has no defined accuracy; NaN keeps it from passing as 0 or 1.
        return {"accuracy": correct / total if total > 0 else float("nan")}
