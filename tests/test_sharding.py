"""Parameters land where the rules table says on a (2, 2, 2) mesh of 8 fake
CPU devices, and sharded forward passes equal unsharded ones."""
import jax
import numpy as np
import optax
import pytest
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec

from rag_jax.models.bart import BartConfig, init_params
from rag_jax.models.bert import BertConfig, DprEncoder
from rag_jax.parallel import rules as R
from rag_jax.parallel.mesh import make_mesh, resolve_mesh_shape
from rag_jax.train.optim import make_optimizer
from rag_jax.train.state import state_shardings


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() == 8, "conftest must force 8 CPU devices"
    return make_mesh((2, 2, 2))


def _expected_spec(names, shape, mesh):
    # Independent reading of the rules table: look each name up, keep the mesh
    # axis only where it divides the dimension.
    table = dict(R.DEFAULT_RULES)
    out = []
    for name, dim in zip(names, shape):
        axes = table[name]
        if axes is None:
            out.append(None)
            continue
        axes = axes if isinstance(axes, tuple) else (axes,)
        kept, size = [], dim
        for a in axes:
            if size % mesh.shape[a] == 0:
                kept.append(a)
                size //= mesh.shape[a]
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*out)


def test_resolve_mesh_shape():
    assert resolve_mesh_shape((-1, 2, 2), 8) == (2, 2, 2)
    assert resolve_mesh_shape((1, -1, 1), 8) == (1, 8, 1)
    with pytest.raises(ValueError, match="at most one"):
        resolve_mesh_shape((-1, -1, 2), 8)
    with pytest.raises(ValueError, match="does not divide"):
        resolve_mesh_shape((-1, 3, 1), 8)
    with pytest.raises(ValueError, match="uses 4 devices"):
        resolve_mesh_shape((2, 2, 1), 8)


def check_tree_shardings(boxed, shardings, mesh):
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    shard_leaves = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    assert len(leaves) == len(shard_leaves) > 0
    sharded_dims = 0
    for leaf, sh in zip(leaves, shard_leaves):
        assert isinstance(leaf, nn.Partitioned)
        assert sh.spec == _expected_spec(leaf.names, leaf.value.shape, mesh), leaf.names
        sharded_dims += sum(a is not None for a in sh.spec)
    assert sharded_dims > 0


def test_dpr_params_follow_rules_and_sharded_forward_matches(mesh):
    config = BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32, projection_dim=8, initializer_range=0.5)
    model = DprEncoder(config)
    ids = np.random.default_rng(0).integers(1, 96, (8, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[3, 7:] = 0
    init = lambda: model.init(jax.random.PRNGKey(0), ids[:1], mask[:1])  # noqa: E731
    boxed = jax.eval_shape(init)["params"]
    shardings = R.mesh_shardings(boxed, mesh)
    check_tree_shardings(boxed, shardings, mesh)
    # Attention heads split over 'tensor', embed over 'fsdp': check one concretely.
    q_kernel = shardings["layer_0"]["attention"]["query"]["kernel"]
    assert q_kernel.spec == PartitionSpec("fsdp", "tensor", None)

    params = nn.meta.unbox(init()["params"])
    want = model.apply({"params": params}, ids, mask)
    sharded_params = jax.device_put(params, shardings)
    batch_sharding = nn.logical_to_mesh_sharding(PartitionSpec("batch", None), mesh, R.DEFAULT_RULES)
    fwd = jax.jit(
        lambda p, i, m: model.apply({"params": p}, i, m),
        in_shardings=(shardings, batch_sharding, batch_sharding),
    )
    got = fwd(sharded_params, ids, mask)
    assert got.sharding.device_set == set(mesh.devices.flat)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_indivisible_dims_are_replicated(mesh):
    spec = R.leaf_spec(("vocab", "embed"), (97, 32), mesh)
    assert spec == PartitionSpec(None, "fsdp")
    spec = R.leaf_spec(("batch", None), (4, 5), mesh)
    assert spec == PartitionSpec(("data", "fsdp"), None)
    spec = R.leaf_spec(("batch", None), (6, 5), mesh)
    assert spec == PartitionSpec("data", None)


def _rag_boxed():
    # Both towers; BART's vocabulary (97) is odd, so 'vocab' cannot take 'tensor'.
    q = DprEncoder(BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                              intermediate_size=64, max_position_embeddings=16, projection_dim=8))
    g = BartConfig(vocab_size=97, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                   decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=16)
    ids = np.ones((1, 4), np.int32)
    return {
        "question_encoder": jax.eval_shape(lambda: q.init(jax.random.PRNGKey(0), ids))["params"],
        "generator": jax.eval_shape(lambda: init_params(g, jax.random.PRNGKey(0), boxed=True)),
    }


def _expected_opt_specs(tx, boxed, mesh):
    """Adam's mu/nu of a parameter: that parameter's rule-table spec; every
    other leaf (counts) replicated. Frozen parameters have no moments."""
    abstract = jax.eval_shape(tx.init, nn.meta.unbox(boxed))
    out, moments = [], 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        attrs = [i for i, k in enumerate(path) if isinstance(k, jax.tree_util.GetAttrKey) and k.name in ("mu", "nu")]
        if not attrs:
            out.append(PartitionSpec())
            continue
        moments += 1
        param = boxed
        for k in path[attrs[-1] + 1:]:
            param = param[k.key]
        assert param.value.shape == leaf.shape
        out.append(_expected_spec(param.names, leaf.shape, mesh))
    return jax.tree.structure(abstract), out, moments


@pytest.mark.parametrize("kind", ["adamw", "ours", "frozen_tower_lr_scales", "frozen_leaves_lr_scales"])
def test_optimizer_state_shardings_follow_their_params(mesh, kind):
    boxed = _rag_boxed()
    kw = dict(weight_decay=0.001, max_grad_norm=0.1)
    tx = {
        "adamw": lambda: optax.adamw(1e-3),
        "ours": lambda: make_optimizer(1e-3, 1, 10, **kw)[0],
        "frozen_tower_lr_scales": lambda: make_optimizer(
            1e-3, 1, 10, frozen=["question_encoder"], lr_scales={"generator": 0.1}, **kw)[0],
        "frozen_leaves_lr_scales": lambda: make_optimizer(
            1e-3, 1, 10, frozen=["generator/shared", "generator/final_logits_bias", "question_encoder/encode_proj/kernel"],
            lr_scales={"question_encoder": 0.1}, **kw)[0],
    }[kind]()
    structure, want, moments = _expected_opt_specs(tx, boxed, mesh)
    got = state_shardings(boxed, tx, mesh).opt_state
    assert jax.tree.structure(got) == structure
    got = jax.tree.leaves(got)
    assert [g.spec for g in got] == want
    assert all(g.mesh == mesh for g in got)
    n_params = len(jax.tree.leaves(nn.meta.unbox(boxed)))
    n_frozen = {"frozen_tower_lr_scales": len(jax.tree.leaves(nn.meta.unbox(boxed["question_encoder"]))),
                "frozen_leaves_lr_scales": 3}.get(kind, 0)
    assert moments == 2 * (n_params - n_frozen)  # mu and nu of every trainable parameter
    assert sum(spec != PartitionSpec() for spec in want) > n_params - n_frozen
