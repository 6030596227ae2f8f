"""Accuracy, an `evaluate` metric module: the fraction of predictions equal to the references (in [0, 1]).

Loaded by path (`evaluate.load(<this file>)`, see `hf_efficient.cli.metrics.load_metric`), so it works offline; the
definition is that of the Hub's `accuracy` module. evaluate copies this file elsewhere to import it: it imports no
module of the package.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Accuracy: the fraction of predictions equal to the references."
_INPUTS = """
Args:
    predictions (list of int): predicted labels.
    references (list of int): true labels.
Returns:
    accuracy (float): in [0, 1]; 0.0 for no examples.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references):
        predictions, references = np.asarray(predictions), np.asarray(references)
        return {"accuracy": float((predictions == references).mean()) if len(references) else 0.0}
