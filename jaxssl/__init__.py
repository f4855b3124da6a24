"""jaxssl: self-supervised pretraining of Transformer language models in JAX/Flax."""
