"""rag_jax.rag."""
