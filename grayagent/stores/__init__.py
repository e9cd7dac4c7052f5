"""Store backends behind one protocol, chosen by URL scheme."""

from __future__ import annotations

import importlib
import os

from grayagent.errors import UsageError
from grayagent.stores.base import Store, VersionMeta, VersionRecord, WatchHandler, digest_of

__all__ = ["Store", "VersionMeta", "VersionRecord", "WatchHandler", "digest_of", "open_store", "resolve_store_url"]

# scheme -> "module:Class"; a backend is imported only when its scheme is used (its client is an extra).
BACKENDS = {
    "file": "grayagent.stores.file:FileStore",
    "etcd": "grayagent.stores.etcd:EtcdStore",
    "etcds": "grayagent.stores.etcd:EtcdStore",
    "nacos": "grayagent.stores.nacos:NacosStore",
}


def resolve_store_url(url: str | None) -> str:
    resolved = url or os.environ.get("GRAYAGENT_STORE", "")
    if not resolved:
        raise UsageError("--store: missing; give --store URL or set GRAYAGENT_STORE")
    return resolved


def open_store(url: str, *, publishing: bool = False, create: bool = False, vanished_ok: bool = False) -> Store:
    """The store a URL names. A directory store must exist (a mistyped path is an error naming it), except:
    - `publishing`: `publish` may create it when its parent directory exists, or anywhere with `create`;
    - `vanished_ok`: the caller knows the store existed (an agent holding cached versions of it): it
      vanished (a lost mount), and the agent serves its last-good version from the cache meanwhile.
    An empty etcd or Nacos prefix is a store where nothing was published yet, not an error."""
    scheme = url.split("://", 1)[0] if "://" in url else "file"
    target = BACKENDS.get(scheme)
    if target is None:
        raise UsageError(f"--store: {url.split('?', 1)[0]}: unknown scheme {scheme!r}; "
                         f"use one of {', '.join(sorted(BACKENDS))}")
    module_name, class_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        extra = "etcd" if scheme.startswith("etcd") else scheme
        raise UsageError(f"--store: the {scheme} store needs its client: pip install 'grayagent[{extra}]' "
                         f"({exc.name} is missing)") from None
    store: Store = getattr(module, class_name)(url)
    if scheme == "file":
        from grayagent.stores.file import FileStore

        assert isinstance(store, FileStore)
        store.require_present(publishing=publishing, create=create, vanished_ok=vanished_ok)
    return store
