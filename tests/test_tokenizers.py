"""Tokenizers from checkpoint dirs agree with transformers' own classes."""
import numpy as np
import pytest

from rag_jax.data.tokenize import load_tokenizer
from rag_jax.data.train_tokenizer import train_bart_tokenizer

CORPUS = [
    "Vorlan Petrescu was born in Miradel in 1921 and worked for Trask Holdings.",
    "Trask Holdings was founded by Ilse Varga; its headquarters are in Osterby.",
    "The river Quell flows through Osterby. Naïve façade — “quotes” and tabs\there.",
] * 20


@pytest.fixture(scope="module")
def bart_dir(tmp_path_factory):
    return train_bart_tokenizer(CORPUS, tmp_path_factory.mktemp("tok"), vocab_size=400, min_frequency=1)


def test_trained_bpe_matches_transformers_bart_tokenizer(bart_dir):
    from transformers import BartTokenizer, BartTokenizerFast

    ours = load_tokenizer(bart_dir, "bart")
    assert (ours.bos_token_id, ours.pad_token_id, ours.eos_token_id) == (0, 1, 2)
    texts = ["Where was Vorlan Petrescu born?", "Osterby / The river Quell // who founded Trask?"]
    got = ours(texts, max_length=24)
    for cls in (BartTokenizer, BartTokenizerFast):
        ref = cls.from_pretrained(str(bart_dir))
        want = ref(texts, padding="max_length", truncation=True, max_length=24, return_tensors="np")
        np.testing.assert_array_equal(got["input_ids"], want["input_ids"], err_msg=cls.__name__)
        np.testing.assert_array_equal(got["attention_mask"], want["attention_mask"])
    assert ours.decode(got["input_ids"])[0] == texts[0]


def test_vocab_json_merges_path_equals_tokenizer_json(bart_dir, tmp_path):
    import shutil

    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copyfile(bart_dir / name, tmp_path / name)
    a = load_tokenizer(bart_dir, "bart")(["Trask Holdings in Osterby"], max_length=12)
    b = load_tokenizer(tmp_path, "bart")(["Trask Holdings in Osterby"], max_length=12)
    np.testing.assert_array_equal(a["input_ids"], b["input_ids"])


def test_truncation_keeps_eos_and_pairs(bart_dir):
    tok = load_tokenizer(bart_dir, "bart")
    out = tok(["word " * 50], max_length=10)
    assert out["input_ids"].shape == (1, 10)
    assert out["input_ids"][0, 0] == 0 and out["input_ids"][0, -1] == 2


def test_missing_tokenizer_files_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        load_tokenizer(tmp_path, "bart")
    with pytest.raises(FileNotFoundError, match="vocab.txt"):
        load_tokenizer(tmp_path, "bert")
