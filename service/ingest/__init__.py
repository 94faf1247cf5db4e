"""Uploaded files read at the boundary, never unpickled.

Tensor (.npz) and text (JSONL) datasets, and the strings the databases can store.
"""
