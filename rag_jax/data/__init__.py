"""rag_jax.data."""
