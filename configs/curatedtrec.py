"""CuratedTrec open-domain QA as in the paper: RAG-Sequence (52.2 test EM in
the paper) with greedy thorough decoding; gold answers are regular
expressions, matched with DPR's convention (config.task.answer_match).
rag_sequence_nq's recipe otherwise. The paper initialises its CuratedTrec
model from the NQ RAG model, the training set being small; this config
starts from DPR-NQ + BART-large like the NQ one."""
from rag_jax.config import sibling


def get_config():
    c = sibling(__file__, "rag_sequence_nq").get_config()
    c.task.kind = "qa"
    c.task.answer_match = "regex"
    # DPR's CuratedTrec files: question<TAB>["regex", ...].
    c.data.train_file = "data/curatedtrec/curatedtrec-train.qa.csv"
    c.data.dev_file = ""
    c.data.test_file = "data/curatedtrec/curatedtrec-test.qa.csv"
    c.data.format = "curatedtrec"
    c.eval.num_beams = 1
    c.eval.decoding = "thorough"
    # DPR's split has 1,125 training questions: about 20 epochs at global batch 64.
    c.train.steps = 350
    c.train.warmup_steps = 50
    c.checkpoint.every = 100
    c.eval.every = 100
    return c
