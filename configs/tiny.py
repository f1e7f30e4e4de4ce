"""A tiny random model on CPU: for tests and smoke runs (seconds per step)."""
from rag_jax.config import sibling


def get_config():
    c = sibling(__file__, "base").get_config()
    c.model.dtype = "float32"
    c.model.dropout = 0.0
    c.data.max_source_length = 16
    c.data.max_target_length = 8
    c.data.max_combined_length = 48
    c.data.num_threads = 1
    c.retrieval.n_docs = 2
    c.train.steps = 20
    c.train.per_device_batch_size = 2
    c.train.lr = 1e-3
    c.train.warmup_steps = 2
    c.train.max_grad_norm = 1.0
    c.train.label_smoothing = 0.0
    c.train.log_every = 1
    c.checkpoint.every = 5
    c.checkpoint.keep = 2
    c.eval.every = 10
    c.eval.batch_size = 4
    c.eval.max_length = 8
    return c
