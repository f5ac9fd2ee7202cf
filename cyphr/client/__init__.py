"""
Cyphr's reference client: identities from a recovery phrase, a profile
sealed with a passphrase, and every message sealed on the client for each
recipient (ML-KEM-1024 and X25519, XChaCha20-Poly1305, Ed25519). See
``cyphr.client.crypto`` for the scheme and ``cyphr-client --help`` for the
command line.
"""

from cyphr.client.client import Client, Contact, IdentityChanged, Message
from cyphr.client.crypto import CryptoError
from cyphr.client.http import ApiError, ClientError

__all__ = ["ApiError", "Client", "ClientError", "Contact", "CryptoError", "IdentityChanged",
           "Message"]
