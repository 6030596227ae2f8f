"""Corpus BLEU and chrF, one `evaluate` metric module with a configuration per score, computed by sacrebleu with its
defaults (one reference per segment, scores in [0, 100]):

- `bleu`: BLEU-4 with brevity penalty, mteval-13a tokenisation, exponential smoothing of zero counts;
- `chrf`: character 6-grams, no word n-grams, beta = 2, whitespace removed.

Loaded by path (`evaluate.load(<this file>, config_name)`, see `hf_efficient.cli.metrics.load_metric`), so it works
offline. evaluate copies this file elsewhere to import it: it imports no module of the package.
"""

import datasets
import evaluate
import sacrebleu

SCORES = {
    # config name: (sacrebleu's corpus function, description, citation)
    "bleu": (
        sacrebleu.corpus_bleu,
        "Corpus BLEU (Papineni et al., 2002) as sacrebleu computes it by default.",
        """@inproceedings{post-2018-call,
    title = "A Call for Clarity in Reporting {BLEU} Scores",
    author = "Post, Matt",
    booktitle = "Proceedings of the Third Conference on Machine Translation: Research Papers",
    year = "2018",
    pages = "186--191",
}""",
    ),
    "chrf": (
        sacrebleu.corpus_chrf,
        "Corpus chrF (Popovic, 2015) as sacrebleu computes it by default.",
        """@inproceedings{popovic-2015-chrf,
    title = "chr{F}: character n-gram {F}-score for automatic {MT} evaluation",
    author = "Popovi{\\'c}, Maja",
    booktitle = "Proceedings of the Tenth Workshop on Statistical Machine Translation",
    year = "2015",
    pages = "392--395",
}""",
    ),
}
_DESCRIPTION = "Corpus BLEU or chrF (the configuration name) as sacrebleu computes them by default."
_INPUTS = """
Args:
    predictions (list of str): generated texts, one per segment.
    references (list of str): the reference text of each segment.
Returns:
    bleu or chrf (float): the corpus score in [0, 100]; 0.0 for no segments.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class SacrebleuCorpus(evaluate.Metric):
    def _info(self):
        if self.config_name not in SCORES:
            raise ValueError(
                f"sacrebleu_corpus: config_name must be one of {sorted(SCORES)}, got {self.config_name!r}"
            )
        _, description, citation = SCORES[self.config_name]
        return evaluate.MetricInfo(
            description=description,
            citation=citation,
            inputs_description=_INPUTS,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
            codebase_urls=["https://github.com/mjpost/sacrebleu"],
        )

    def _compute(self, predictions, references):
        if not predictions:  # (sacrebleu refuses an empty corpus)
            return {self.config_name: 0.0}
        corpus_score = SCORES[self.config_name][0]
        return {self.config_name: corpus_score(predictions, [references]).score}
