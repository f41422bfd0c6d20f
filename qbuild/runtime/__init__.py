"""Runtime: sessions and loops on a compiled artifact (``embed``: sentence embeddings in length buckets).

Submodules import numpy, tokenizers and onnxruntime inside their functions only.
"""
