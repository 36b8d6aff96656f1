"""Target platforms: the ``Platform`` interface, the registry and the built-ins.

Filled in by the platforms issue; carving and the store do not depend on it.
"""
