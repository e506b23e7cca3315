"""tierd: a tiered-memory daemon that serves tensors to local model processes.

Importing this package is cheap: it pulls in no torch, no event loop, no daemon state.
The daemon lives in :mod:`tierd.server`; the client library is ``tierd_client``.
"""

__version__ = "0.1.0"
