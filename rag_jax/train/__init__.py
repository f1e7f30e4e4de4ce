"""rag_jax.train."""
