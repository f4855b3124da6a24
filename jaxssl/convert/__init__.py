"""Import/export of public checkpoints: `hf_bert` (HuggingFace BERT <-> jaxssl export).

Job: `python -m jaxssl.convert {from-hf,to-hf} --src ... --out ...`.
"""
