"""Proxy targets: a pure renderer plus an applier that owns all process work for that proxy."""
