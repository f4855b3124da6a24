"""Evaluation: downstream metrics (GLUE, SQuAD, tagging) and perplexity."""
