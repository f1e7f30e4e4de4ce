"""Pure Flax (linen) networks: DPR/BERT towers and BART. No losses here."""
