"""The contract between the corpora and the model: text grammar, camera conventions, record schemas.

numpy and jsonschema only: no torch, no ray, so every other package can import it cheaply.
"""
