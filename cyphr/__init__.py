"""
Cyphr: the server of a zero-knowledge, post-quantum end-to-end encrypted
messenger. It stores and routes only what clients have already encrypted.
"""

__version__ = "0.1.0"
