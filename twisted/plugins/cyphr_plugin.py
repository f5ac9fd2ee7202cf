"""
The twistd plugin: ``twistd -n cyphr``.

Only a ServiceMaker lives here; the module is named as a string so that
``twistd --help`` does not import the server.
"""

from twisted.application.service import ServiceMaker

cyphr = ServiceMaker(
    "Cyphr",
    "cyphr.tap",
    "A zero-knowledge end-to-end encrypted messenger server.",
    "cyphr",
)
