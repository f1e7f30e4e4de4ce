"""Bucketed padding (rag_jax/data/padding.py): the RAG loss of a real training
batch is the same cut to its buckets as padded to the maxima; the bucket is
chosen from every process's rows."""
import dataclasses
import json

import jax
import numpy as np
import pytest

from rag_jax.data.padding import bucket_for, bucket_set, trim_to_buckets, used_length
from rag_jax.parallel.host_arrays import process_max
from rag_jax.train.config_checks import validate
from rag_jax.train.setup import build_models, length_buckets, make_task
from tests.train_fixtures import make_world, tiny_config


def test_bucket_set_and_choice():
    assert bucket_set((64, 16, 32, 300, 400), 48) == (16, 32, 48)
    assert bucket_set((), 25) == (25,)
    b = bucket_set((16, 32, 64, 96, 128, 160, 192, 224, 256), 300)
    assert b[-1] == 300 and len(b) == 10
    assert [bucket_for(n, b) for n in (1, 16, 17, 200, 257, 300)] == [16, 16, 32, 224, 300, 300]
    with pytest.raises(ValueError, match="exceeds"):
        bucket_for(301, b)
    assert used_length(np.array([[1, 1, 0, 0], [1, 0, 0, 0]])) == 2
    assert used_length(np.zeros((2, 3, 5))) == 1


def _padded_batch(ctx_lens, tgt_lens, L=12, T=6, pad=1):
    ctx = np.full((len(ctx_lens), 2, L), pad, np.int32)
    mask = np.zeros_like(ctx)
    for i, n in enumerate(ctx_lens):
        ctx[i, :, :n] = 7
        mask[i, :, :n] = 1
    labels = np.full((len(tgt_lens), T), pad, np.int32)
    for i, n in enumerate(tgt_lens):
        labels[i, :n] = 5
    q = np.ones((len(ctx_lens), 4), np.int32)
    return {"question_input_ids": q, "question_attention_mask": q, "question_token_type_ids": 0 * q,
            "context_input_ids": ctx, "context_attention_mask": mask, "labels": labels,
            "doc_embeds": np.zeros((len(ctx_lens), 2, 3), np.float32)}


def test_lengths_agreed_between_processes():
    buckets = {"context": bucket_set((4, 8), 12), "target": bucket_set((2, 4), 6)}
    batch = _padded_batch([3, 2], [2, 1])
    alone = trim_to_buckets(batch, buckets, pad_token_id=1)
    assert alone["context_input_ids"].shape == (2, 2, 4) and alone["labels"].shape == (2, 2)
    assert alone["question_input_ids"].shape == (2, 4)  # no question buckets: untouched
    # Another process holds a 9-token context and a 3-token answer: both processes cut to its buckets.
    seen = []

    def agree(used):
        seen.append(used.tolist())
        return np.maximum(used, [9, 3])

    both = trim_to_buckets(batch, buckets, pad_token_id=1, agree=agree)
    assert seen == [[3, 2]]
    assert both["context_input_ids"].shape == (2, 2, 12) and both["labels"].shape == (2, 4)
    np.testing.assert_array_equal(both["context_attention_mask"], batch["context_attention_mask"])
    # One process: the maximum over processes is its own.
    np.testing.assert_array_equal(process_max(np.array([3, 2])), [3, 2])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("padding")
    paths = make_world(root)
    cfg = tiny_config(paths)
    # Maxima above the smallest bucket (16), so every group has something to cut.
    cfg.data.max_source_length, cfg.data.max_target_length, cfg.data.max_combined_length = 40, 24, 300
    # Word-like tokens and room for whole passages: contexts shorter than the maximum.
    cfg.model.tiny.generator.vocab_size, cfg.model.tiny.generator.max_position_embeddings = 1000, 304
    models = build_models(cfg, root / "run", jax.random.PRNGKey(0))
    return cfg, models, paths


def test_bucketed_loss_equals_max_length_loss(world):
    cfg, models, paths = world
    validate(cfg)
    assert cfg.data.padding == "bucket"  # the default
    task = make_task(cfg, models)
    full = dataclasses.replace(task, length_buckets=None)
    rows = [json.loads(line) for line in open(paths["train"], encoding="utf-8")]
    # Mixed lengths: the shortest and longest questions and answers of the training file.
    rows.sort(key=lambda r: len(r["question"]) + len(r["answers"][0]))
    rows = rows[:2] + rows[-2:]
    qs, ans = [r["question"] for r in rows], [r["answers"][0] for r in rows]
    q_params = models.params["question_encoder"]
    a, b = full.train_batch(q_params, qs, ans), task.train_batch(q_params, qs, ans)
    buckets = length_buckets(cfg.data)
    for group, key in (("question", "question_input_ids"), ("context", "context_input_ids"), ("target", "labels")):
        assert b[key].shape[-1] in buckets[group]
        assert b[key].shape[-1] < a[key].shape[-1], (group, b[key].shape, a[key].shape)
        # The cut columns held only padding: the kept ones are the same tokens.
        np.testing.assert_array_equal(a[key][..., : b[key].shape[-1]], b[key])
    assert (a["context_attention_mask"][..., b["context_input_ids"].shape[-1]:] == 0).all()
    # Rows of different lengths in the batch (so some are padded in both).
    lens = a["context_attention_mask"].sum(-1)
    assert lens.min() < lens.max()
    # Freshly initialised, the generator predicts nearly the same tokens from
    # every context; large random weights make the loss depend on each one.
    leaves, tree = jax.tree.flatten(models.params["generator"])
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    params = {**models.params, "generator": jax.tree.unflatten(
        tree, [jax.random.normal(k, x.shape, x.dtype) * 1.0 for k, x in zip(keys, leaves)])}
    # The random encoder's scores differ by tens: shrunk, no document takes all the prior.
    for x in (a, b):
        x["doc_embeds"] = x["doc_embeds"] * 1e-2
    variants = {v: dataclasses.replace(task, variant=v) for v in ("sequence", "token")}
    loss = jax.jit(lambda p, x: {v: t.loss_fn(p, x, None)[0] for v, t in variants.items()})
    got, want = jax.device_get(loss(params, b)), jax.device_get(loss(params, a))
    # The documents differ (sequence != token) by far more than the tolerance below.
    assert abs(got["sequence"] - got["token"]) > 1e-4 * abs(got["token"])
    for v in variants:
        assert abs(got[v] - want[v]) <= 1e-6 * abs(want[v]), (v, got[v], want[v])


@pytest.mark.parametrize("field, value, msg", [
    ("padding", "longest", "data.padding"),
    ("length_buckets", (64, 32), "data.length_buckets: must be strictly ascending"),
    ("length_buckets", (16, 0), r"data.length_buckets\[1\]"),
])
def test_padding_config_is_validated(field, value, msg):
    from configs.base import get_config

    c = get_config()
    setattr(c.data, field, value)
    with pytest.raises(ValueError, match=msg):
        validate(c)
