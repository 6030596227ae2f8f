"""Exact match, an `evaluate` metric module: the percentage of segments generated exactly, surrounding whitespace
aside (in [0, 100], on the scale of BLEU and chrF).

Loaded by path (`evaluate.load(<this file>)`, see `hf_efficient.cli.metrics.load_metric`), so it works offline.
evaluate copies this file elsewhere to import it: it imports no module of the package.
"""

import datasets
import evaluate

_DESCRIPTION = "Exact match: the percentage of predictions equal to their reference after stripping whitespace."
_INPUTS = """
Args:
    predictions (list of str): generated texts, one per segment.
    references (list of str): the reference text of each segment.
Returns:
    exact_match (float): in [0, 100]; 0.0 for no segments.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        if not predictions:
            return {"exact_match": 0.0}
        matches = sum(p.strip() == r.strip() for p, r in zip(predictions, references))
        return {"exact_match": 100.0 * matches / len(predictions)}
