"""Family-specific example building: pure (seed, step) -> batch functions for each pretraining family.

mlm_nsp + masking_units + bert_pipeline: BERT (masked LM + next-sentence pairs); packed_lm: GPT and ELMo (documents
packed into full rows); denoising: encoder-decoder (BART/MASS corruptions); rows: what they share.
"""
