"""Parameters land where the rules table says on a (2, 2, 2) mesh of 8 fake
CPU devices, and sharded forward passes equal unsharded ones."""
import jax
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec

from rag_jax.models.bert import BertConfig, DprEncoder
from rag_jax.parallel import rules as R
from rag_jax.parallel.mesh import make_mesh, resolve_mesh_shape


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
    batch_sharding = NamedSharding(mesh, R.logical_to_mesh_spec(("batch", "length")))
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
    spec = R.leaf_spec(("batch", "length"), (4, 5), mesh)
    assert spec == PartitionSpec(("data", "fsdp"), None)
    spec = R.leaf_spec(("batch", "length"), (6, 5), mesh)
    assert spec == PartitionSpec("data", None)
