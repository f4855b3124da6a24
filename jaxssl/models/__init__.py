"""The networks: BERT (+ Big Bird attention), GPT (+ Llama variant), encoder-decoder, ELMo and their layers.

Which model a config names is decided in jaxssl/families/ (the registry); nothing here knows about training.
"""
