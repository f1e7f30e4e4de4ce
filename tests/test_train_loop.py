"""launch-level training on a tiny real setup: 8 fake devices, (2, 2, 2) mesh."""
import os
import signal

import jax
import numpy as np
import pytest
from flax import linen as nn

from rag_jax.parallel import rules as R
from rag_jax.train.loop import train_and_evaluate
from rag_jax.train.setup import boxed_params
from tests.train_fixtures import make_world, tiny_config


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("train"))


def _dir_digest(root):
    import hashlib

    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _leaves_with_paths(tree):
    return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_sharded_training_learns_and_moves_question_encoder(paths, tmp_path):
    cfg = tiny_config(paths, steps=8, global_batch_size=8, lr=3e-3)
    cfg.mesh.shape = (2, 2, 2)
    index_before = _dir_digest(paths["index"])
    out = train_and_evaluate(cfg, tmp_path / "run", verbose=False)
    # The document encoder is not in the train state at all and the index it
    # produced is byte-for-byte untouched (paper section 2.4).
    assert set(out["params"]) == {"question_encoder", "generator"}
    assert _dir_digest(paths["index"]) == index_before
    losses = out["losses"]
    assert len(losses) == 8
    assert np.mean([losses[7], losses[8]]) < np.mean([losses[1], losses[2]]), losses

    from rag_jax.hf.bert import load_dpr

    _, q0, _ = load_dpr(paths["encoder"])
    moved = [not np.allclose(a, np.asarray(b)) for a, b in
             zip(jax.tree.leaves(q0), jax.tree.leaves(out["params"]["question_encoder"]))]
    assert any(moved), "joint training must update the question encoder"

    # The first-step loss on one device equals the sharded run's.
    cfg1 = tiny_config(paths, steps=1, global_batch_size=8, lr=3e-3)
    cfg1.mesh.shape = (1, 1, 1)
    single = train_and_evaluate(cfg1, tmp_path / "single", verbose=False, devices=jax.devices()[:1])
    np.testing.assert_allclose(single["losses"][1], losses[1], rtol=2e-5)


def test_state_shardings_follow_rules(paths, tmp_path):
    from rag_jax.parallel.mesh import make_mesh
    from rag_jax.train.setup import build_models
    from rag_jax.train.optim import optimizer_from_config
    from rag_jax.train.state import create_state, state_shardings

    cfg = tiny_config(paths)
    mesh = make_mesh((2, 2, 2))
    models = build_models(cfg, tmp_path, jax.random.PRNGKey(0))
    tx, _ = optimizer_from_config(cfg.train)
    boxed = boxed_params(models)
    state = create_state(models.params, tx, jax.random.PRNGKey(0), state_shardings(boxed, tx, mesh))
    names = {
        jax.tree_util.keystr(p): b.names
        for p, b in jax.tree_util.tree_flatten_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
    }
    params = _leaves_with_paths(state.params)
    assert set(params) == set(names)
    n_sharded = 0
    for key, arr in params.items():
        assert arr.sharding.spec == R.leaf_spec(names[key], arr.shape, mesh), key
        n_sharded += any(a is not None for a in arr.sharding.spec)
    assert n_sharded > 10
    # Adam moments share their parameter's sharding (wherever optax nests them).
    moments = [
        (jax.tree_util.keystr(p), leaf)
        for p, leaf in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
        if jax.tree_util.keystr(p).endswith("['generator']['shared']['embedding']")
    ]
    assert moments
    for _, leaf in moments:
        assert leaf.sharding.spec == state.params["generator"]["shared"]["embedding"].sharding.spec


def test_frozen_retriever_keeps_question_encoder(paths, tmp_path):
    cfg = tiny_config(paths, steps=3, global_batch_size=8, freeze_question_encoder=True)
    out = train_and_evaluate(cfg, tmp_path / "frozen", verbose=False)
    from rag_jax.hf.bert import load_dpr

    _, q0, _ = load_dpr(paths["encoder"])
    for a, b in zip(jax.tree.leaves(q0), jax.tree.leaves(out["params"]["question_encoder"])):
        np.testing.assert_array_equal(a, np.asarray(b))


# Slow (three training runs; resuming like an uninterrupted run is also tested in test_faults_checkpoint.py): `make test-slow`; the default run stays within CI's 15 minutes.
@pytest.mark.slow
def test_sigterm_then_resume_reproduces_losses(paths, tmp_path):
    cfg = tiny_config(paths, steps=6, global_batch_size=4)
    cfg.checkpoint.every = 2
    full = train_and_evaluate(cfg, tmp_path / "full", verbose=False)["losses"]

    def kill_at_3(step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    part = train_and_evaluate(cfg, tmp_path / "resumed", verbose=False, on_step=kill_at_3)
    assert part["step"] == 3 and sorted(part["losses"]) == [1, 2, 3]
    rest = train_and_evaluate(cfg, tmp_path / "resumed", verbose=False)
    assert sorted(rest["losses"]) == [4, 5, 6]
    for s in (4, 5, 6):
        np.testing.assert_allclose(rest["losses"][s], full[s], rtol=1e-5)


def test_closed_book_trains_without_index(paths, tmp_path):
    cfg = tiny_config(paths, steps=2, global_batch_size=4, closed_book=True)
    cfg.retrieval.index_dir = ""
    out = train_and_evaluate(cfg, tmp_path / "cb", verbose=False)
    assert all(np.isfinite(v) for v in out["losses"].values())


def test_nan_loss_stops_without_overwriting_checkpoint(paths, tmp_path):
    from rag_jax.train.checkpointing import CheckpointManager, tree_all_finite

    # An absurd learning rate without clipping makes the loss non-finite within a few steps.
    cfg = tiny_config(paths, steps=12, global_batch_size=4, lr=1e12, warmup_steps=0, max_grad_norm=0.0,
                      end_lr=0.0, schedule="constant")
    cfg.checkpoint.every = 1
    with pytest.raises(FloatingPointError, match="untouched") as err:
        train_and_evaluate(cfg, tmp_path / "nan", verbose=False)
    bad_step = int(str(err.value).split(":")[0].split()[-1])
    mngr = CheckpointManager(tmp_path / "nan" / "checkpoints", every=1, async_save=False)
    try:
        last = mngr.latest_step()
        assert last is not None and last < bad_step
        state, _, _ = mngr.restore()
        assert tree_all_finite(state["params"])
    finally:
        mngr.close()
