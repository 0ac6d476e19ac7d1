"""Teachers: the encoders that embed images and captions once, into a store (and the frozen student's backbones).

- ``registry``: the table of spec kinds and `build_encoder` (the spec list: docs/teachers.md)
- ``base``: the `Encoder` protocol, the shared encoder classes; ``hashing``: weights named by content hash
- model builders: ``sentence_models`` (minilm-l6, sentence-transformers:), ``efficientnet_lite``, ``timm_models``,
  ``open_clip_models``
- encoders that run no model: ``precomputed`` (image features by id), ``precomputed_text`` (caption embeddings),
  ``grid`` (a backbone's feature map as regions, and the ``none`` text side)

`pipeline.encoders` re-exports the public names for scripts written against it.
"""
