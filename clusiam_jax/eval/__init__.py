"""Evaluation of frozen embeddings: kNN, linear probe, DSMIL, ABMIL, cluster composition,
mean pooling, cluster maps.

Everything here works on embedding arrays (and coordinates for maps), so it
runs on any exported features, not only this project's.
"""
