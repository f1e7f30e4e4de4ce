"""HuggingFace checkpoints: strict import and export of BERT/DPR, BART and RAG directories."""
