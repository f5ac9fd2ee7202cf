"""
schemathesis hooks of tools/fuzz_api.py (loaded through SCHEMATHESIS_HOOKS):
a TUS PATCH body is ``application/offset+octet-stream``, bytes as they
are, which schemathesis has no serializer for of its own.
"""

import schemathesis
from schemathesis.transport.serialization import serialize_binary


@schemathesis.serializer("application/offset+octet-stream")
def offset_octet_stream(ctx, value):  # type: ignore[no-untyped-def]
    return serialize_binary(value)
