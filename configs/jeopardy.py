"""Jeopardy question generation as in the paper: given an answer entity,
generate the clue (SearchQA splits); RAG-Token, which did best there
(Q-BLEU-1), beam 4, 10 documents; otherwise rag_sequence_nq's recipe.
Clues are longer than NQ answers: 40 target tokens (our choice)."""
from rag_jax.config import sibling


def get_config():
    c = sibling(__file__, "rag_sequence_nq").get_config()
    c.model.variant = "token"
    c.task.kind = "question_generation"
    # Answer -> question pairs: the record's question is the answer entity,
    # its answer the Jeopardy clue.
    c.data.train_file = "data/jeopardy/train.jsonl"
    c.data.dev_file = "data/jeopardy/dev.jsonl"
    c.data.test_file = "data/jeopardy/test.jsonl"
    c.data.format = "jeopardy"
    c.data.max_source_length = 32  # an entity name
    c.data.max_target_length = 40
    c.retrieval.n_docs = 10
    c.eval.num_beams = 4
    c.eval.max_length = 40
    return c
