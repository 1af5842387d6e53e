"""Embedding export: a run's weights over a patch source, written per slide.

  format.py   the on-disk layout (names, writers, readers, resume check): the only owner
  embed.py    the embedding loop (an Embedder and EmbedOptions)
  run.py      the run-level entry point (restore, normalization, what to embed)
"""
