"""``model.remat`` (none | minimal | full): the same params, loss and
gradients in every mode, decoding with a cache unchanged, and the config
field validated."""
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from rag_jax.config import load_config
from rag_jax.hf import bart as hf_bart, bert as hf_bert
from rag_jax.models.bart import Bart, BartConfig, decode_step, init_cache
from rag_jax.models.bert import BertConfig, DprEncoder
from rag_jax.rag.model import RagConfig, rag_loss
from rag_jax.rag.settings import RagSettings
from rag_jax.train import config_checks

B, K, LQ, L, T = 2, 3, 7, 11, 5
# One layer per stack keeps the three compiles cheap; dropout is on everywhere,
# so the test also covers the recomputed dropout masks matching the forward's.
QE = dict(vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
          max_position_embeddings=32, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
GEN = dict(vocab_size=48, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
           decoder_attention_heads=2, encoder_ffn_dim=24, decoder_ffn_dim=24, max_position_embeddings=64,
           dropout=0.1, attention_dropout=0.1, activation_dropout=0.1)


# LLVM's optimisation is most of a CPU compile (30 s -> 6 s for one step here)
# and changes only the generated machine code. XLA's CPU pipeline drops
# remat's optimization barriers and its CSE pass then merges the recomputed
# matmuls back into the forward's (bench_train.py --remat-probe); without
# that pass the compiled program really recomputes, which is what is tested.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True,
                "xla_disable_hlo_passes": "cse"}


def _jit(fn, *args):
    return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)(*args)


def _config(mode: str) -> RagConfig:
    return RagConfig(BertConfig(**QE, remat=mode), BartConfig(**GEN, remat=mode),
                     RagSettings(variant="sequence", n_docs=K))


def _init(cfg: RagConfig):
    ids = jnp.ones((1, 4), jnp.int32)
    return nn.meta.unbox({
        "question_encoder": DprEncoder(cfg.question_encoder).init(jax.random.PRNGKey(0), ids, ids)["params"],
        "generator": Bart(cfg.generator).init(jax.random.PRNGKey(1), ids, ids, ids)["params"],
    })


def _params(cfg: RagConfig):
    return _jit(lambda: _init(cfg))  # one compile instead of op-by-op dispatch


def _batch():
    rng = np.random.default_rng(0)
    ctx_mask = (np.arange(L)[None, None] < rng.integers(4, L + 1, (B, K))[..., None]).astype(np.int32)
    return {
        "question_input_ids": rng.integers(1, 60, (B, LQ)).astype(np.int32),
        "question_attention_mask": np.ones((B, LQ), np.int32),
        "doc_embeds": rng.normal(size=(B, K, 16)).astype(np.float32),
        "context_input_ids": rng.integers(3, 48, (B, K, L)).astype(np.int32),
        "context_attention_mask": ctx_mask,
        "labels": rng.integers(3, 48, (B, T)).astype(np.int32),
    }


@functools.lru_cache(maxsize=None)
def _loss_and_grads(mode: str):
    """(params, loss, gradients) of the tiny RAG-Sequence loss with dropout."""
    params = _params(_config("none"))
    cfg = _config(mode)
    # Same param names (nn.remat must not rename scopes: HF import/export and
    # checkpoints address params by path), shapes and dtypes.
    abstract = jax.eval_shape(lambda: _init(cfg))
    assert [p for p, _ in jax.tree_util.tree_leaves_with_path(abstract)] == \
        [p for p, _ in jax.tree_util.tree_leaves_with_path(params)], mode
    assert abstract == jax.eval_shape(lambda: params), mode

    def loss(p, b):
        return rag_loss(p, b, config=cfg, epsilon=0.1, dropout_rng=jax.random.PRNGKey(3))

    return (params, *_jit(jax.value_and_grad(loss), params, _batch()))


# "minimal" in the default run (two compiles); "full" adds a third, -m slow.
@pytest.mark.parametrize("mode", ["minimal", pytest.param("full", marks=pytest.mark.slow)])
def test_remat_gives_the_same_param_tree_loss_and_gradients(mode):
    _, ref_loss, ref_grads = _loss_and_grads("none")
    _, loss, grads = _loss_and_grads(mode)
    # The forward pass is the same program: the loss is bitwise equal.
    assert float(loss) == float(ref_loss), mode
    # The backward recomputes the forward's values in another order of fused
    # ops; the gradients may differ only in float32 rounding: 1e-6 relative.
    # The key-projection biases have a gradient that is zero in exact
    # arithmetic (softmax ignores a constant added to every key's score), so
    # theirs is rounding noise (~1e-13 here) whose last bits follow the
    # summation order: they are held to 1e-6 of the whole tree's largest
    # gradient instead of 1e-6 of themselves.
    scale = max(float(np.abs(np.asarray(g)).max()) for g in jax.tree.leaves(ref_grads))
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-6, atol=1e-6 * scale,
                                   err_msg=f"{mode} {jax.tree_util.keystr(path)}")


def _decode_fn(mode: str):
    model = Bart(BartConfig(**GEN, remat=mode))

    def run(p, ids, mask):
        enc = model.apply({"params": p}, ids, mask, method=Bart.encode)
        cache = init_cache(model, p, enc, mask, 4)
        logits, cache = decode_step(model, p, cache, jnp.full((ids.shape[0],), 2), enc, mask)
        return logits, cache

    return run


def _decode_inputs():
    ids = jnp.asarray(np.random.default_rng(1).integers(3, 48, (2, 6)), jnp.int32)
    return ids, jnp.ones_like(ids)


def test_cached_decoding_traces_the_same_under_remat():
    """init_cache + decode_step (the mutable cache through nn.remat's lifted
    transform): the same cache names, shapes and dtypes (traced, not compiled)."""
    params = jax.eval_shape(lambda: _init(_config("none")))["generator"]
    shapes = {mode: jax.eval_shape(_decode_fn(mode), params, *_decode_inputs()) for mode in ("none", "full")}
    assert shapes["full"] == shapes["none"]


@pytest.mark.slow
def test_cached_decoding_is_unchanged_by_remat():
    """Bitwise the same logits and cache: outside a gradient a checkpoint
    lowers to its plain body."""
    params = _params(_config("none"))["generator"]
    out = {mode: _jit(_decode_fn(mode), params, *_decode_inputs()) for mode in ("none", "full")}
    jax.tree.map(np.testing.assert_array_equal, out["full"], out["none"])


def test_remat_field_is_validated():
    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.py"
    assert load_config(tiny).model.remat == "none"
    assert load_config(tiny, ["--config.model.remat=full"]).model.remat == "full"
    cfg = load_config(tiny, ["--config.model.remat=some"])
    with pytest.raises(ValueError, match=r"config\.model\.remat: 'some' not in"):
        config_checks.validate(cfg)
    with pytest.raises(ValueError, match="remat"):
        BartConfig(**GEN, remat="all")


def test_remat_is_ours_not_an_hf_attribute():
    """An exported config.json stays a plain HF one, and reads back as remat none."""
    bart = BartConfig(**GEN, remat="full")
    hf = hf_bart.config_to_hf(bart)
    assert "remat" not in hf and hf_bart.config_from_hf(hf) == bart.replace(remat="none")
    assert hf_bart.config_from_hf(hf, remat="minimal") == bart.replace(remat="minimal")
    bert = BertConfig(**QE, remat="minimal")
    hf = hf_bert.config_to_hf(bert, "question")
    assert "remat" not in hf and hf_bert.config_from_hf(hf) == bert.replace(remat="none")
