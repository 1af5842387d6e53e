"""Evaluation of frozen embeddings read from an export: kNN, linear probe, DSMIL, ABMIL,
cluster composition, mean pooling, cluster atlas."""
