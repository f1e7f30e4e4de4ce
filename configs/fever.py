"""FEVER fact verification as in the paper (section 3.4): RAG-Sequence over
DPR + BART-large (rag_sequence_nq's recipe), each class label mapped to one
generator token and trained as claim -> label generation, with no
supervision on evidence; scored by label accuracy.

``--config=configs/fever.py`` is 3-way; ``--config=configs/fever.py:2way``
is the 2-way task (SUPPORTS / REFUTES): its NOT ENOUGH INFO claims are
dropped from training and evaluation (config.task.ignore_labels).

BART-large's BPE splits the label strings, so they are trained as the words
" true", " false", " neutral" (config.task.label_words). Which words are one
token was not checked against the real vocabulary offline: the run checks it
at start and names any word that is not.
"""
from rag_jax.config import sibling

LABELS = ("SUPPORTS", "REFUTES", "NOT ENOUGH INFO")
WORDS = (" true", " false", " neutral")


def get_config(ways: str = "3way"):
    if ways not in ("3way", "2way"):
        raise ValueError(f"configs/fever.py: argument must be 3way or 2way, got {ways!r}")
    c = sibling(__file__, "rag_sequence_nq").get_config()
    c.task.kind = "classification"
    n = 3 if ways == "3way" else 2
    c.task.labels = LABELS[:n]
    c.task.label_words = WORDS[:n]
    c.task.ignore_labels = LABELS[n:]
    # FEVER's original files: {"id", "claim", "label", "evidence"} per line
    # (paper_test keeps its labels, unlike shared_task_test).
    c.data.train_file = "data/fever/train.jsonl"
    c.data.dev_file = "data/fever/paper_dev.jsonl"
    c.data.test_file = "data/fever/paper_test.jsonl"
    c.data.format = "fever"
    c.data.max_target_length = 8  # <s> label </s>
    c.eval.max_length = 8  # unused: classification scores the label tokens, it does not decode
    return c
