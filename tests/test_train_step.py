"""The generic sharded train step: shardings follow the rules, sharded ==
single-device, gradient accumulation == one big batch, loss goes down."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from jax.sharding import PartitionSpec

from rag_jax.models.bert import BertConfig, DprEncoder
from rag_jax.parallel import rules as R
from rag_jax.parallel.mesh import make_mesh
from rag_jax.train.state import create_state, state_shardings
from rag_jax.train.step import jit_train_step, make_train_step

CONFIG = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                    intermediate_size=64, max_position_embeddings=16, projection_dim=8,
                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=0.2)
MODEL = DprEncoder(CONFIG)


def loss_fn(params, batch, rng):
    del rng
    out = MODEL.apply({"params": params}, batch["ids"], batch["mask"])
    err = jnp.mean(jnp.square(out - batch["target"]), axis=-1)
    return jnp.mean(err), {"max_err": jnp.max(err)}


def _batch(n=16):
    rng = np.random.default_rng(0)
    return {
        "ids": rng.integers(1, 64, (n, 10)).astype(np.int32),
        "mask": np.ones((n, 10), np.int32),
        "target": rng.normal(size=(n, 8)).astype(np.float32),
    }


def _boxed():
    return jax.eval_shape(lambda: MODEL.init(jax.random.PRNGKey(0), np.zeros((1, 10), np.int32)))["params"]


def _params():
    return nn.meta.unbox(MODEL.init(jax.random.PRNGKey(0), np.zeros((1, 10), np.int32))["params"])


@pytest.fixture(scope="module")
def mesh():
    return make_mesh((2, 2, 2))


def test_sharded_step_matches_single_device_and_follows_rules(mesh):
    tx = optax.adamw(1e-2, weight_decay=1e-3)
    batch = _batch()
    step = make_train_step(loss_fn, tx)

    # single device
    single = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    sh1 = state_shardings(_boxed(), tx, single)
    s1 = create_state(_params(), tx, jax.random.PRNGKey(1), sh1)
    b1 = jax.tree.map(lambda x: nn.logical_to_mesh_sharding(PartitionSpec("batch"), single, R.DEFAULT_RULES), batch)
    s1, m1 = jit_train_step(step, sh1, b1)(s1, batch)

    sh = state_shardings(_boxed(), tx, mesh)
    state = create_state(_params(), tx, jax.random.PRNGKey(1), sh)
    bsh = jax.tree.map(lambda x: nn.logical_to_mesh_sharding(PartitionSpec("batch"), mesh, R.DEFAULT_RULES), batch)
    train = jit_train_step(step, sh, bsh)
    state, m = train(state, batch)
    np.testing.assert_allclose(float(m["loss"]), float(m1["loss"]), rtol=1e-6)

    # Parameters and Adam moments carry the rule-table shardings.
    boxed = _boxed()
    for path, leaf in jax.tree_util.tree_flatten_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]:
        want = R.leaf_spec(leaf.names, leaf.value.shape, mesh)
        keys = [p.key for p in path]
        got = state.params
        for k in keys:
            got = got[k]
        assert got.sharding.spec == want, keys
    adam = state.opt_state[0]
    assert adam.mu["layer_0"]["attention"]["query"]["kernel"].sharding.spec == state.params["layer_0"]["attention"]["query"]["kernel"].sharding.spec
    assert adam.mu["layer_0"]["attention"]["query"]["kernel"].sharding.spec[1] == "tensor"
    assert adam.count.sharding.spec == jax.sharding.PartitionSpec()

    losses = [float(m["loss"])]
    for _ in range(5):
        state, m = train(state, batch)
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0] * 0.9, losses
    assert int(state.step) == 6


def test_grad_accumulation_equals_full_batch():
    tx = optax.sgd(0.1)
    batch = _batch(8)
    params = _params()
    single = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    sh = state_shardings(_boxed(), tx, single)
    outs = []
    for accum in (1, 4):
        state = create_state(params, tx, jax.random.PRNGKey(0), sh)
        state, m = jax.jit(make_train_step(loss_fn, tx, accum_steps=accum))(state, batch)
        outs.append((state.params, float(m["loss"])))
    np.testing.assert_allclose(outs[0][1], outs[1][1], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(outs[0][0]), jax.tree.leaves(outs[1][0])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_accumulation_rejects_indivisible_batch():
    tx = optax.sgd(0.1)
    single = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    state = create_state(_params(), tx, jax.random.PRNGKey(0), state_shardings(_boxed(), tx, single))
    with pytest.raises(ValueError, match="not divisible"):
        jax.jit(make_train_step(loss_fn, tx, accum_steps=3))(state, _batch(8))


def test_question_encoder_lr_scale_is_a_per_group_learning_rate():
    from rag_jax.train.optim import make_optimizer

    params = {"question_encoder": {"w": jnp.ones(3)}, "generator": {"w": jnp.ones(3)}}
    grads = {"question_encoder": {"w": jnp.array([1.0, -2.0, 3.0])}, "generator": {"w": jnp.array([1.0, -2.0, 3.0])}}
    kw = dict(warmup_steps=0, total_steps=10, schedule="constant", weight_decay=0.1)
    tx, _ = make_optimizer(1e-2, lr_scales={"question_encoder": 0.01}, **kw)
    ref, _ = make_optimizer(1e-4, **kw)
    u, _ = tx.update(grads, tx.init(params), params)
    r, _ = ref.update(grads, ref.init(params), params)
    np.testing.assert_allclose(u["question_encoder"]["w"], r["question_encoder"]["w"], rtol=1e-5)
    assert float(jnp.abs(u["generator"]["w"]).min()) > 50 * float(jnp.abs(u["question_encoder"]["w"]).max())
    with pytest.raises(ValueError, match="unknown parameter groups"):
        bad, _ = make_optimizer(1e-2, lr_scales={"retriever": 0.1}, **kw)
        bad.update(grads, bad.init(params), params)
