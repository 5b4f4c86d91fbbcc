"""Shared utilities for medfound: position embeddings, model registry, blur degradations, ..."""
