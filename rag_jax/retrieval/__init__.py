"""rag_jax.retrieval: corpus store, document encoding job, ScaNN/exact MIPS index, hot-swappable retriever.

    corpus = build_corpus("psgs_w100.tsv", "wiki/corpus")
    store = encode_corpus(corpus, rag_jax.load_encoder(ctx_dir), "wiki/emb")
    build_index(store, "wiki/index", kind="scann", corpus=corpus, include_corpus=True)
    retriever = Retriever("wiki/index")
    docs = retriever.retrieve(question_vectors, k=5)   # rows, ids, scores, doc_embeds, titles, texts
    retriever.swap("wiki2018/index")                   # model params untouched
"""
from rag_jax.retrieval.corpus import Corpus, CorpusError, Passage, build_corpus, open_corpus, read_passages, split_documents, write_corpus
from rag_jax.retrieval.embeddings import EmbeddingStore, import_embeddings, write_store
from rag_jax.retrieval.encode import encode_corpus, make_context_tokenize
from rag_jax.retrieval.index import (
    ExactIndex,
    IndexMismatchError,
    LoadedIndex,
    ScannIndex,
    ScannParams,
    build_index,
    load_index,
    neighbor_recall,
)
from rag_jax.retrieval.retriever import Retrieved, Retriever

__all__ = [
    "Corpus", "CorpusError", "EmbeddingStore", "ExactIndex", "IndexMismatchError", "LoadedIndex", "Passage",
    "Retrieved", "Retriever", "ScannIndex", "ScannParams", "build_corpus", "build_index", "encode_corpus",
    "import_embeddings", "load_index", "make_context_tokenize", "open_corpus", "read_passages",
    "neighbor_recall", "split_documents", "write_corpus", "write_store",
]
