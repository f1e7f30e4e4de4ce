"""RAG-Sequence on Natural Questions at paper scale.

DPR-NQ question encoder (facebook/dpr-question_encoder-single-nq-base) +
BART-large (facebook/bart-large), from local HF directories; hyperparameters
of HF ``examples/research_projects/rag/finetune_rag.sh``: lr 3e-5, 500
warm-up steps, polynomial decay, label smoothing 0.1, weight decay 0.001,
grad norm 0.1, dropout 0.1, n_docs 5, source 128 / target 25 tokens, batch 8
per device (8 GPUs there: global batch 64).
"""
from rag_jax.config import sibling


def get_config():
    c = sibling(__file__, "base").get_config()
    c.model.variant = "sequence"
    c.model.question_encoder = "models/dpr-question_encoder-single-nq-base"
    c.model.generator = "models/bart-large"
    c.model.dtype = "bfloat16"
    c.model.dropout = 0.1
    # DPR's NQ QA files (question<TAB>["answer", ...]).
    c.data.train_file = "data/nq/nq-train.qa.csv"
    c.data.dev_file = "data/nq/nq-dev.qa.csv"
    c.data.test_file = "data/nq/nq-test.qa.csv"
    c.data.format = "dpr_csv"
    c.data.max_source_length = 128
    c.data.max_target_length = 25
    c.data.max_combined_length = 300
    c.retrieval.index_dir = "indexes/psgs_w100_nq"
    c.retrieval.n_docs = 5
    c.train.per_device_batch_size = 8
    c.train.grad_accum_steps = 1
    c.train.lr = 3e-5
    c.train.warmup_steps = 500
    c.train.schedule = "polynomial"
    c.train.weight_decay = 0.001
    c.train.max_grad_norm = 0.1
    c.train.label_smoothing = 0.1
    c.train.adam_eps = 1e-8
    # About 12 epochs of NQ train (79,168 questions, ~1,240 steps each) at global
    # batch 64; HF's script sets epochs instead and stops on dev EM.
    c.train.steps = 15_000
    c.train.log_every = 50
    # Pod default: batch over data, parameters FSDP-sharded within a host.
    c.mesh.shape = (-1, 8, 1)
    c.checkpoint.every = 1000
    c.checkpoint.keep = 3
    c.eval.every = 1000
    c.eval.batch_size = 8
    c.eval.num_beams = 1
    c.eval.max_length = 25
    return c
