"""The demo world (rag_jax.demo.world): small real retriever (MiniLM),
random-init BART trained from scratch on fictional facts; a few CPU minutes."""
from rag_jax.config import sibling


def get_config():
    c = sibling(__file__, "base").get_config()
    # Filled in by the demo / command line: the world's files and the index.
    c.data.train_file = "demo_out/world/train.jsonl"
    c.data.dev_file = "demo_out/world/dev.jsonl"
    c.data.test_file = "demo_out/world/test.jsonl"
    c.data.format = "jsonl"
    c.data.max_source_length = 32
    c.data.max_target_length = 16
    c.data.max_combined_length = 128
    c.retrieval.index_dir = "demo_out/index"
    c.retrieval.n_docs = 5
    c.model.dtype = "float32"  # CPU: bf16 buys nothing
    c.model.tiny.generator.update(dict(
        vocab_size=4096, d_model=128, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=512, decoder_ffn_dim=512, max_position_embeddings=192,
        # BART's init_std 0.02 leaves this from-scratch generator on a long
        # plateau before it copies answers; 0.1 with sinusoidal position
        # tables learns in ~25k examples (train/reader_warmup.py).
        init_std=0.1,
    ))
    c.model.tiny.generator_sinusoidal_positions = 0.15
    c.train.steps = 2000
    c.train.per_device_batch_size = 4
    c.train.lr = 5e-4
    c.train.warmup_steps = 100
    c.train.max_grad_norm = 1.0
    c.train.weight_decay = 0.01
    c.train.log_every = 50
    c.checkpoint.every = 500
    c.eval.every = 500
    c.eval.batch_size = 16
    c.eval.max_length = 16
    return c
