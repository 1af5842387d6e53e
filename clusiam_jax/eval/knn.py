"""Patch-level kNN evaluation (docs/method.md §7); the search is clusiam_jax/knn.py's."""
from clusiam_jax.eval.metrics import classification_metrics
from clusiam_jax.knn import knn_predict


def knn_evaluate(ref_embeddings, ref_labels, query_embeddings, query_labels, ks=(1,),
                 positive_label=None):
    """{'k=1': classification_metrics of the queries, ...}; references from other slides."""
    predictions = knn_predict(ref_embeddings, ref_labels, query_embeddings, ks=ks)
    return {f'k={k}': classification_metrics(query_labels, pred, positive_label=positive_label)
            for k, pred in predictions.items()}
