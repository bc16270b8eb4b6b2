"""Retrieval: catalogues, item embeddings in Chroma, collaborative and sequential signals, fusion.

This package knows nothing of LLMs, agents or HTTP.
"""
