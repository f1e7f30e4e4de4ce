"""RAG marginal NLL: parity with HF RagSequence/RagToken (loss and gradients),
loading and exporting HF RAG directories, and marginal properties."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import rag_tiny as T
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import RagSequenceForGeneration, RagTokenForGeneration

import rag_jax
from rag_jax.hf.io import CheckpointError
from rag_jax.rag import marginals
from rag_jax.rag.inputs import build_context_strings, context_string
from rag_jax.rag.model import doc_logits, rag_loss

B, K, L, TGT = 3, 3, 10, 7


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for variant in ("sequence", "token"):
        hf = T.build(variant, n_docs=K)
        d = tmp_path_factory.mktemp(variant)
        hf.save_pretrained(d)
        out[variant] = (hf, rag_jax.load_rag(d), d)
    return out


def _inputs(start=(T.EOS, T.BOS)):
    ids, mask, scores = T.context(B, K, L)
    labels = T.labels(B, TGT, start=start)
    return ids, mask, scores, labels


def _hf_loss(hf, ids, mask, scores, labels, eps, excl):
    hf.config.label_smoothing = eps
    kw = {"exclude_bos_score": excl} if isinstance(hf, RagSequenceForGeneration) else {}
    with torch.no_grad():
        out = hf(
            context_input_ids=torch.tensor(ids), context_attention_mask=torch.tensor(mask),
            doc_scores=torch.tensor(scores), labels=torch.tensor(labels), reduce_loss=False, n_docs=K, **kw,
        )
    return out.loss.numpy(), out.logits.numpy()


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-6))


@pytest.mark.parametrize("variant", ["sequence", "token"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("excl", [False, True])
@pytest.mark.parametrize("start", [(T.EOS, T.BOS), (T.BOS,)])
def test_loss_parity(models, variant, eps, excl, start):
    if variant == "token" and excl:
        pytest.skip("HF RAG-Token has no exclude_bos_score")
    hf, ours, _ = models[variant]
    ids, mask, scores, labels = _inputs(start)
    want, hf_logits = _hf_loss(hf, ids, mask, scores, labels, eps, excl)
    got = ours.nll(ids.reshape(B, K, L), mask.reshape(B, K, L), scores, labels, variant=variant,
                   epsilon=eps, exclude_bos_score=excl)
    assert got.shape == (B,)
    assert _rel(got, want) < 1e-5, (got, want)
    if variant == "sequence":
        # The pure marginal on HF's own logits, too: isolates the marginal from the generator.
        pure = marginals.sequence_nll(
            hf_logits.reshape(B, K, TGT, -1), scores, labels, pad_token_id=T.PAD, bos_token_id=T.BOS,
            epsilon=eps, exclude_bos_score=excl,
        )
        assert _rel(pure, want) < 1e-5
    # labels with padding really are masked: changing pad rows' tails changes nothing
    assert (labels == T.PAD).any()


def test_exclude_bos_changes_sequence_loss(models):
    _, ours, _ = models["sequence"]
    ids, mask, scores, labels = _inputs()
    a = ours.nll(ids.reshape(B, K, L), mask.reshape(B, K, L), scores, labels, "sequence")
    b = ours.nll(ids.reshape(B, K, L), mask.reshape(B, K, L), scores, labels, "sequence", exclude_bos_score=True)
    assert np.all(np.asarray(b) < np.asarray(a))


@pytest.mark.parametrize("variant", ["sequence", "token"])
def test_gradient_parity(models, variant):
    hf, ours, _ = models[variant]
    ids, mask, scores, labels = _inputs()
    eps = 0.1
    hf.config.label_smoothing = eps
    hf.zero_grad()
    s_t = torch.tensor(scores, requires_grad=True)
    out = hf(context_input_ids=torch.tensor(ids), context_attention_mask=torch.tensor(mask), doc_scores=s_t,
             labels=torch.tensor(labels), reduce_loss=True, n_docs=K)
    out.loss.backward()
    cfg = ours.config

    def f(gen_params, s):
        logits = doc_logits(cfg.generator, gen_params, ids.reshape(B, K, L), mask.reshape(B, K, L), labels)
        return marginals.reduce(marginals.rag_nll(logits, s, labels, variant, pad_token_id=T.PAD, epsilon=eps), "sum")

    loss, (g_gen, g_s) = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(ours.params["generator"], jnp.asarray(scores))
    assert _rel(loss, out.loss.item()) < 1e-5
    np.testing.assert_allclose(np.asarray(g_s), s_t.grad.numpy(), rtol=1e-4, atol=1e-5)
    gen = hf.rag.generator
    pairs = [
        (g_gen["shared"]["embedding"], gen.model.shared.weight.grad),
        (g_gen["decoder_layers_1"]["fc2"]["kernel"], gen.model.decoder.layers[1].fc2.weight.grad.T),
        (g_gen["encoder_layers_0"]["self_attn"]["query"]["kernel"].reshape(16, 16),
         gen.model.encoder.layers[0].self_attn.q_proj.weight.grad.T),
    ]
    for ours_g, hf_g in pairs:
        hf_g = hf_g.numpy()
        np.testing.assert_allclose(np.asarray(ours_g), hf_g, rtol=2e-4, atol=2e-5 * np.abs(hf_g).max())


def test_question_encoder_gets_gradient(models):
    hf, ours, _ = models["sequence"]
    ids, mask, scores, labels = _inputs()
    rng = np.random.default_rng(3)
    batch = {
        "question_input_ids": rng.integers(0, 60, (B, 6)), "question_attention_mask": np.ones((B, 6), np.int32),
        "doc_embeds": rng.normal(size=(B, K, 16)).astype(np.float32),
        "context_input_ids": ids.reshape(B, K, L), "context_attention_mask": mask.reshape(B, K, L), "labels": labels,
    }
    f = jax.jit(jax.value_and_grad(lambda p, bt: rag_loss(p, bt, config=ours.config, reduction="sum")))
    loss, grads = f(ours.params, batch)
    # same number through torch: q from HF's question encoder, then the HF loss
    with torch.no_grad():
        q = hf.rag.question_encoder(torch.tensor(batch["question_input_ids"]),
                                    attention_mask=torch.tensor(batch["question_attention_mask"]))[0]
        s = torch.einsum("bd,bkd->bk", q, torch.tensor(batch["doc_embeds"]))
    hf.config.label_smoothing = 0.0
    want, _ = _hf_loss(hf, ids, mask, s.numpy(), labels, 0.0, False)
    assert _rel(loss, want.sum()) < 1e-5
    g = grads["question_encoder"]["word_embeddings"]["embedding"]
    assert float(jnp.abs(g).max()) > 0


def test_roundtrip_save_hf(models, tmp_path):
    for variant, cls in (("sequence", RagSequenceForGeneration), ("token", RagTokenForGeneration)):
        hf, ours, _ = models[variant]
        ours.save_hf(tmp_path / variant)
        back, info = cls.from_pretrained(tmp_path / variant, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        ref = hf.state_dict()
        for k, v in back.state_dict().items():
            assert torch.equal(v, ref[k]), k
        again = rag_jax.load_rag(tmp_path / variant)
        assert again.config == ours.config


def test_rejects_unknown_config(models, tmp_path):
    import json
    import shutil

    _, _, d = models["token"]
    bad = tmp_path / "bad"
    shutil.copytree(d, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["mystery_option"] = 3
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="mystery_option"):
        rag_jax.load_rag(bad)
    cfg.pop("mystery_option")
    cfg["generator"]["normalize_before"] = True
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="normalize_before"):
        rag_jax.load_rag(bad)


@pytest.mark.parametrize("key, value", [("reduce_loss", True), ("do_deduplication", False)])
def test_rejects_unimplemented_rag_settings(models, tmp_path, key, value):
    import json
    import shutil

    _, _, d = models["sequence"]
    shutil.copytree(d, tmp_path / "bad")
    cfg = json.loads((tmp_path / "bad" / "config.json").read_text())
    cfg[key] = value
    (tmp_path / "bad" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=key):
        rag_jax.load_rag(tmp_path / "bad")


@pytest.mark.parametrize("variant", ["sequence", "token"])
def test_nll_defaults_are_the_configs_as_hf_forward(models, tmp_path, variant):
    """``label_smoothing`` and ``exclude_bos_score`` of an HF config are the
    defaults of ``nll``, as of HF ``forward``'s loss (RAG-Token ignores the latter)."""
    cls = RagSequenceForGeneration if variant == "sequence" else RagTokenForGeneration
    hf, _, _ = models[variant]
    hf.config.label_smoothing, hf.config.exclude_bos_score = 0.1, True
    try:
        hf.save_pretrained(tmp_path)
    finally:
        hf.config.label_smoothing, hf.config.exclude_bos_score = 0.0, False
    theirs = cls.from_pretrained(tmp_path).eval()
    ours = rag_jax.load_rag(tmp_path)
    assert (ours.config.rag.label_smoothing, ours.config.rag.exclude_bos_score) == (0.1, True)
    ids, mask, scores, labels = _inputs()
    with torch.no_grad():
        want = theirs(context_input_ids=torch.tensor(ids), context_attention_mask=torch.tensor(mask),
                      doc_scores=torch.tensor(scores), labels=torch.tensor(labels), n_docs=K).loss.numpy()
    got = ours.nll(ids.reshape(B, K, L), mask.reshape(B, K, L), scores, labels)
    assert _rel(got, want) < 1e-5, (got, want)
    plain = ours.nll(ids.reshape(B, K, L), mask.reshape(B, K, L), scores, labels, epsilon=0.0, exclude_bos_score=False)
    assert not np.allclose(np.asarray(plain), np.asarray(got))


# --- properties ------------------------------------------------------------


_SEQ = jax.jit(marginals.sequence_nll, static_argnames=("pad_token_id", "bos_token_id", "exclude_bos_score"))
_TOK = jax.jit(marginals.token_nll, static_argnames=("pad_token_id", "exclude_bos_score"))


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), n_real=st.integers(2, 6), eps=st.sampled_from([0.0, 0.2]))
def test_one_document_is_plain_likelihood(seed, n_real, eps):
    t = 6  # fixed shapes (one compile); the padding length varies instead
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, (2, 1, t, 11)).astype(np.float32)
    labels = rng.integers(3, 11, (2, t))
    labels[1, n_real:] = T.PAD
    scores = rng.normal(size=(2, 1)).astype(np.float32)
    lp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits[:, 0]), -1))
    tgt = np.concatenate([labels[:, 1:], np.full((2, 1), T.PAD)], 1)
    keep = tgt != T.PAD
    tok = np.take_along_axis(lp, tgt[..., None], -1)[..., 0]
    plain = -(tok * keep).sum(-1)
    smooth = -(lp.sum(-1) * keep).sum(-1)
    want = (1 - eps) * plain + eps / 11 * smooth
    for fn in (_SEQ, _TOK):
        got = fn(logits, scores, labels, pad_token_id=T.PAD, epsilon=eps)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), excl=st.booleans())
def test_permuting_documents_changes_nothing(seed, excl):
    k = 4
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, (2, k, 5, 9)).astype(np.float32)
    scores = rng.normal(0, 3, (2, k)).astype(np.float32)
    labels = rng.integers(0, 9, (2, 5))
    # No pad/bos among the targets: HF drops the doc prior when target step 1
    # is padding, and then moving scores legitimately changes nothing.
    labels = np.where(np.isin(labels, [T.PAD, T.BOS]), 8, labels)
    perm = rng.permutation(k)
    for fn in (_SEQ, _TOK):
        a = fn(logits, scores, labels, pad_token_id=T.PAD, epsilon=0.1, exclude_bos_score=excl)
        b = fn(logits[:, perm], scores[:, perm], labels, pad_token_id=T.PAD, epsilon=0.1, exclude_bos_score=excl)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5)
    # ...while moving a score to another document does change it
    a = _SEQ(logits, scores, labels, pad_token_id=T.PAD, epsilon=0.1, exclude_bos_score=excl)
    c = _SEQ(logits, scores[:, ::-1], labels, pad_token_id=T.PAD, epsilon=0.1, exclude_bos_score=excl)
    assert not np.allclose(np.asarray(a), np.asarray(c))


def test_bf16_logits_are_stable():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 40, (2, 3, 6, 50)).astype(np.float32)
    scores = rng.normal(0, 30, (2, 3)).astype(np.float32)
    labels = rng.integers(3, 50, (2, 6))
    for fn in (marginals.sequence_nll, marginals.token_nll):
        f32 = fn(logits, scores, labels, pad_token_id=T.PAD, epsilon=0.1)
        bf = fn(jnp.asarray(logits, jnp.bfloat16), scores, labels, pad_token_id=T.PAD, epsilon=0.1)
        assert np.all(np.isfinite(np.asarray(bf)))
        np.testing.assert_allclose(np.asarray(bf), np.asarray(f32), rtol=2e-2)


def test_context_strings_match_hf_postprocess():
    assert context_string('"Paris"', "Capital  of France.", "where?") == "Paris / Capital of France. // where?"
    # HF strips one quote at each end and replaces double spaces once
    assert context_string('""x""', "a   b", "q") == '"x" / a  b // q'
    rows = build_context_strings([["t1", "t2"]], [["x1", "x2"]], ["q"])
    assert rows == [["t1 / x1 // q", "t2 / x2 // q"]]
    with pytest.raises(ValueError):
        build_context_strings([["t"]], [["x", "y"]], ["q"])
