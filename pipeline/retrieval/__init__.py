"""Retrieval: ingest a folder, chunk it, embed it, index it (faiss + BM25), search it."""
