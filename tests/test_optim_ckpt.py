"""Optimizer (schedules, decay mask, frozen subtrees) and the checkpoint manager."""
import os
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rag_jax.train.checkpointing import CheckpointManager, PreemptionFlag, tree_all_finite
from rag_jax.train import optim as O
from rag_jax.train.state import TrainState


# ------------------------------------------------------------- schedules
def test_polynomial_schedule_hand_values():
    s = O.make_schedule(1e-3, warmup_steps=10, total_steps=110, kind="polynomial", end_lr=1e-7)
    expect = {0: 0.0, 5: 5e-4, 10: 1e-3, 60: (1e-3 - 1e-7) * 0.5 + 1e-7, 110: 1e-7, 500: 1e-7}
    for step, v in expect.items():
        assert float(s(step)) == pytest.approx(v, rel=1e-5, abs=1e-12), step
    lin = O.make_schedule(1e-3, 10, 110, kind="linear")
    assert float(lin(60)) == pytest.approx(5e-4) and float(lin(200)) == 0.0
    const = O.make_schedule(1e-3, 10, 110, kind="constant")
    assert float(const(3)) == pytest.approx(3e-4) and float(const(1000)) == pytest.approx(1e-3)
    sq = O.make_schedule(1.0, 0, 100, kind="polynomial", end_lr=0.0, power=2.0)
    assert float(sq(50)) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="unknown schedule"):
        O.make_schedule(1e-3, 1, 10, kind="cosine")
    with pytest.raises(ValueError, match="learning rate"):
        O.make_schedule(0.0, 1, 10)


def test_schedules_match_transformers():
    torch = pytest.importorskip("torch")
    tr = pytest.importorskip("transformers")
    cases = [
        ("polynomial", lambda opt: tr.get_polynomial_decay_schedule_with_warmup(opt, 50, 400, lr_end=1e-7, power=1.0)),
        ("linear", lambda opt: tr.get_linear_schedule_with_warmup(opt, 50, 400)),
        ("constant", lambda opt: tr.get_constant_schedule_with_warmup(opt, 50)),
    ]
    for kind, make in cases:
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=3e-5)
        sched = make(opt)
        ref = []
        for _ in range(450):
            ref.append(opt.param_groups[0]["lr"])  # lr used by this update
            opt.step()
            sched.step()
        ours = O.make_schedule(3e-5, 50, 400, kind=kind)
        got = np.asarray(jax.vmap(ours)(jnp.arange(450)))
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-12, err_msg=kind)


# ------------------------------------------------------- masks and freezing
def _params():
    return {
        "question_encoder": {
            "embeddings_ln": {"scale": jnp.ones(4), "bias": jnp.zeros(4)},
            "layer_0": {"attention": {"query": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones(4)}},
                        "output_ln": {"scale": jnp.ones(4), "bias": jnp.ones(4)}},
        },
        "generator": {
            "shared": {"embedding": jnp.ones((8, 4))},
            "encoder_ln_embedding": {"scale": jnp.ones(4), "bias": jnp.ones(4)},
            "decoder": {"layer_0": {"fc1": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones(4)},
                                    "final_layer_norm": {"scale": jnp.ones(4)}}},
            "final_logits_bias": jnp.zeros((1, 8)),
        },
    }


def test_decay_mask_follows_hf_no_decay():
    mask = O.decay_mask(_params())
    flat = {O.path_name(p): v for p, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
    decayed = sorted(k for k, v in flat.items() if v)
    assert decayed == [
        "generator/decoder/layer_0/fc1/kernel",
        "generator/shared/embedding",
        "question_encoder/layer_0/attention/query/kernel",
    ]
    # "lnx" or "kernel_norms" inside words are no norm layers; a plain "scale" elsewhere is.
    assert not O.is_no_decay([jax.tree_util.DictKey("plnx"), jax.tree_util.DictKey("kernel")])
    assert O.is_no_decay([jax.tree_util.DictKey("ln_f"), jax.tree_util.DictKey("scale")])


def test_weight_decay_applies_only_to_masked_leaves():
    p = _params()
    tx, _ = O.make_optimizer(1e-1, 0, 10, schedule="constant", weight_decay=0.5)
    zeros = jax.tree.map(jnp.zeros_like, p)
    u, _ = tx.update(zeros, tx.init(p), p)  # zero grads: only decay moves params
    assert float(jnp.abs(u["generator"]["shared"]["embedding"]).max()) == pytest.approx(0.1 * 0.5)
    assert float(jnp.abs(u["generator"]["encoder_ln_embedding"]["scale"]).max()) == 0.0
    assert float(jnp.abs(u["question_encoder"]["layer_0"]["attention"]["query"]["bias"]).max()) == 0.0


def test_frozen_subtree_unchanged_and_clip_sees_trainable_only():
    p = _params()
    tx, _ = O.make_optimizer(1e-2, 0, 100, schedule="constant", weight_decay=0.01, max_grad_norm=1.0,
                             frozen=["question_encoder"])
    state = tx.init(p)
    # Adam moments exist only for trainable leaves (memory for the frozen tower saved).
    moments = [x for x in jax.tree.leaves(state) if x.ndim > 0]
    n_train = len(jax.tree.leaves(p["generator"]))
    assert len(moments) == 2 * n_train
    key = jax.random.PRNGKey(0)

    @jax.jit
    def step(p, state, key):
        g = jax.tree.map(lambda x: jax.random.normal(key, x.shape), p)
        g["question_encoder"] = jax.tree.map(lambda x: 1e6 * jnp.ones_like(x), g["question_encoder"])
        u, state = tx.update(g, state, p)
        return optax.apply_updates(p, u), state, u

    p1 = p
    for i in range(3):
        p1, state, u = step(p1, state, jax.random.fold_in(key, i))
    for a, b in zip(jax.tree.leaves(p["question_encoder"]), jax.tree.leaves(p1["question_encoder"])):
        np.testing.assert_array_equal(a, b)
    moved = [float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(p["generator"]), jax.tree.leaves(p1["generator"]))]
    assert min(moved) > 1e-3
    # Clipping must ignore frozen gradients (torch clips only params that require grad):
    # huge frozen grads leave the trainable update exactly as with zero frozen grads.
    small = jax.tree.map(lambda x: 0.01 * jnp.ones_like(x), p)
    huge = dict(small, question_encoder=jax.tree.map(lambda x: 1e6 * jnp.ones_like(x), p["question_encoder"]))
    zero = dict(small, question_encoder=jax.tree.map(jnp.zeros_like, p["question_encoder"]))
    clip_tx, _ = O.make_optimizer(1.0, 0, 10, schedule="constant", max_grad_norm=0.05, frozen=["question_encoder"])
    u_huge, _ = clip_tx.update(huge, clip_tx.init(p), p)
    u_zero, _ = clip_tx.update(zero, clip_tx.init(p), p)
    _assert_tree_equal(u_huge, u_zero)
    typo, _ = O.make_optimizer(1.0, 0, 10, schedule="constant", frozen=["question_encodr"])
    with pytest.raises(ValueError, match="matches no parameter"):
        typo.init(p)


# ------------------------------------------------------------ checkpoints
def _state(seed=0):
    p = _params()
    tx, _ = O.make_optimizer(1e-2, 1, 10, weight_decay=0.01, max_grad_norm=1.0, frozen=["question_encoder"])
    opt = tx.init(p)
    g = jax.tree.map(lambda x: jnp.full_like(x, 0.3 + seed), p)
    u, opt = tx.update(g, opt, p)
    return TrainState(step=jnp.asarray(7 + seed, jnp.int32), params=optax.apply_updates(p, u),
                      opt_state=opt, rng=jax.random.PRNGKey(seed + 11))


def _assert_tree_equal(a, b):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_checkpoint_round_trip_with_shardings(tmp_path):
    st = _state()
    data_state = {"grain": {"next_index": 42}, "pipeline": {"seed": 3, "shard": [0, 1]}}
    with CheckpointManager(tmp_path / "ckpt", every=1, keep=3, async_save=True) as mngr:
        assert mngr.latest_step() is None
        assert mngr.save(7, st, data_state)
        mngr.wait()
        assert mngr.latest_step() == 7
        # Without a target: values back, in saved (dict) structure.
        raw, ds, step = mngr.restore()
        assert step == 7 and ds == data_state
        np.testing.assert_array_equal(raw["rng"], st.rng)
        # With a target carrying shardings: same structure, shardings applied.
        mesh = Mesh(np.array(jax.devices()[:8]).reshape(8), ("fsdp",))
        repl = NamedSharding(mesh, PartitionSpec())
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl), st)
        emb = st.params["generator"]["shared"]["embedding"]
        target.params["generator"]["shared"]["embedding"] = jax.ShapeDtypeStruct(
            emb.shape, emb.dtype, sharding=NamedSharding(mesh, PartitionSpec("fsdp")))
        back, ds2, _ = mngr.restore(target=target)
        _assert_tree_equal(back, st)
        assert ds2 == data_state
        assert back.params["generator"]["shared"]["embedding"].sharding.spec == PartitionSpec("fsdp")
        assert isinstance(back, TrainState)


def test_typed_prng_key_round_trip(tmp_path):
    st = {"w": jnp.arange(3.0), "rng": jax.random.key(5)}
    with CheckpointManager(tmp_path / "k", every=1, async_save=False) as mngr:
        mngr.save(1, st, {})
        back, _, _ = mngr.restore(target=st)
    assert jax.dtypes.issubdtype(back["rng"].dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(jax.random.key_data(back["rng"]), jax.random.key_data(st["rng"]))


def test_keep_n_interval_and_force(tmp_path):
    st = _state()
    with CheckpointManager(tmp_path / "c", every=2, keep=2, async_save=True) as mngr:
        saved = [s for s in range(1, 9) if mngr.save(s, st, {"s": s})]
        assert saved == [2, 4, 6, 8]
        assert mngr.save(9, st, {"s": 9}, force=True)  # off-interval final save
        assert not mngr.save(9, st, {"s": 9}, force=True)  # already on disk
        mngr.wait()
        assert mngr.all_steps() == [8, 9]
        _, ds, step = mngr.restore(8)
        assert (step, ds) == (8, {"s": 8})
        with pytest.raises(FileNotFoundError, match="step 2"):
            mngr.restore(2)


def test_incomplete_checkpoint_never_latest(tmp_path):
    root = tmp_path / "c"
    st = _state()
    with CheckpointManager(root, every=1, keep=5, async_save=False) as mngr:
        mngr.save(3, st, {"s": 3})
    # A save killed mid-write leaves orbax's tmp dir; a hand-truncated step
    # dir lacks the metadata written at finalization.
    shutil.copytree(root / "3", root / "9.orbax-checkpoint-tmp-1234567")
    shutil.copytree(root / "3", root / "7")
    os.remove(root / "7" / "_CHECKPOINT_METADATA")
    with CheckpointManager(root, every=1, keep=5, async_save=False) as mngr:
        assert mngr.latest_step() == 3
        assert mngr.all_steps() == [3]
        _, ds, step = mngr.restore()
        assert (step, ds) == (3, {"s": 3})


def test_nan_state_refused_keeps_last_good(tmp_path):
    st = _state()
    bad = st.replace(params=jax.tree.map(lambda x: x * jnp.nan, st.params))
    assert tree_all_finite(st) and not tree_all_finite(bad)
    with CheckpointManager(tmp_path / "c", every=1, async_save=False) as mngr:
        mngr.save(1, st, {})
        with pytest.raises(FloatingPointError, match="step 2"):
            mngr.save(2, bad, {}, check_finite=True)
        assert mngr.latest_step() == 1


def test_sigterm_sets_flag():
    with PreemptionFlag() as flag:
        assert not flag.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.requested and flag.sync(5)
    assert signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, signal.default_int_handler) or callable(
        signal.getsignal(signal.SIGTERM))


def test_sharded_train_state_restores_onto_rule_shardings(tmp_path):
    """A (2, 2, 2)-mesh TrainState with our optimizer comes back bit-exact with
    the shardings the rules table assigns (what a restarted run asks for)."""
    from flax import linen as nn

    from rag_jax.models.bert import BertConfig, DprEncoder
    from rag_jax.parallel.mesh import make_mesh
    from rag_jax.train.state import create_state, state_shardings

    model = DprEncoder(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=16, initializer_range=0.2))
    x = np.zeros((1, 8), np.int32)
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))["params"]
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), x)["params"])
    tx, _ = O.make_optimizer(1e-3, 1, 10, weight_decay=0.001, max_grad_norm=0.1, frozen=["embeddings_ln"])
    mesh = make_mesh((2, 2, 2))
    shardings = state_shardings(boxed, tx, mesh)
    st = create_state(params, tx, jax.random.PRNGKey(3), shardings)

    @jax.jit
    def update(st):
        g = jax.tree.map(lambda p: jnp.ones_like(p) * 0.1, st.params)
        u, opt = tx.update(g, st.opt_state, st.params)
        return st.replace(params=optax.apply_updates(st.params, u), opt_state=opt, step=st.step + 1)

    st = update(st)
    with CheckpointManager(tmp_path / "c", every=1, async_save=True) as mngr:
        mngr.save(1, st, {"grain": {"next_index": 1}})
        mngr.wait()
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), st, shardings)
        back, _, _ = mngr.restore(target=target)
    _assert_tree_equal(back, st)
    for a, s in zip(jax.tree.leaves(back), jax.tree.leaves(shardings)):
        assert a.sharding.is_equivalent_to(s, a.ndim)
    emb = back.params["word_embeddings"]["embedding"]
    assert len(emb.sharding.device_set) == 8 and emb.addressable_shards[0].data.shape != emb.shape
