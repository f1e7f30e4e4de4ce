"""rag_jax.retrieval."""
