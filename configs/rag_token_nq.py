"""RAG-Token on Natural Questions at paper scale: the RAG-Sequence config
with the per-token marginalization (same HF finetune_rag.sh hyperparameters)."""
from rag_jax.config import sibling


def get_config():
    c = sibling(__file__, "rag_sequence_nq").get_config()
    c.model.variant = "token"
    return c
