"""Training data: corpora (Shakespeare, local .txt/.jsonl), tokenizer training, packing and batches."""
