"""Evaluation beyond the fine-tune dev metrics: in-context learning and contextual embeddings, with their plots."""
