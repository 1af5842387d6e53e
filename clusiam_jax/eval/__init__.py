"""Evaluation of frozen embeddings read from an export (eval/tasks.py lists the evaluators)."""
