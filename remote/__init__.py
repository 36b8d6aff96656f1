"""The RPC worker and the client-side proxy that is a ``Platform``.

Filled in by the remote-worker issue.
"""
