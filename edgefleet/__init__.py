"""edgefleet wire contract: bundle format, manifest, trust root, topics, message schemas.

Both sides import this package; it depends only on the standard library,
``cryptography``, ``zstandard`` and ``rich`` (for the CLI), so it installs on a
Raspberry Pi.
"""

__version__ = "0.1.0"
