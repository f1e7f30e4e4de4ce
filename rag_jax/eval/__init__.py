"""rag_jax.eval."""
