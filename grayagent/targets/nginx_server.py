"""The `server {}` blocks that nginx reload mode and dynamic mode render alike.

Pure text: a service's server (listen, server names, access log, `location /` around a proxy_pass), the
404 catch-all for ports where every service names hosts, and the agent's loopback-only control server.
"""

from __future__ import annotations

from grayagent.rules.model import Release, Service
from grayagent.targets.layout import default_service, services_by_listen

# Inside `location /`, after proxy_pass: keep-alive to the upstream, the client's Host, the peer in XFF.
PROXY_SETTINGS = ("        proxy_http_version 1.1;\n"
                  '        proxy_set_header Connection "";\n'
                  "        proxy_set_header Host $host;\n"
                  "        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n")


def service_server(svc: Service, reuseport: bool, access_log: str, location: str) -> str:
    """One service's server block. `location`: the lines of `location /` before PROXY_SETTINGS (they end
    with the proxy_pass); `reuseport` only on the first server of a listen address (nginx takes it once)."""
    listen = str(svc.listen) + (" reuseport" if reuseport else "")
    names = " ".join(svc.hosts) if svc.hosts else '""'
    return ("server {\n"
            f"    listen {listen};\n"
            f"    server_name {names};\n"
            + (f"    access_log {access_log} grayagent_json;\n" if access_log else "")
            + "    location / {\n"
            + location
            + PROXY_SETTINGS +
            "    }\n"
            "}\n")


def catch_all_servers(release: Release) -> list[str]:
    """Ports where every service names hosts get a 404 default server, so unknown hosts never reach a service."""
    out = []
    for listen, services in services_by_listen(release).items():
        if default_service(services) is None:
            out.append(f"server {{\n    listen {listen} default_server;\n    server_name _;\n    return 404;\n}}\n")
    return out


def loopback_server(comment: str, listen: str, locations: str) -> str:
    """The agent's own endpoints (version, and in dynamic mode the push): loopback clients only."""
    return (f"# {comment}\n"
            "server {\n"
            f"    listen {listen};\n"
            "    access_log off;\n"
            "    allow 127.0.0.0/8;\n    allow ::1;\n    deny all;\n"
            + locations +
            "    location / {\n        return 404;\n    }\n"
            "}\n")


# nginx keeps each listen address's server names in a hash whose buckets are server_names_hash_bucket_size
# bytes (64 by default on x86-64); one name takes 8 + (len + 2 rounded up to 8) bytes, and a bucket also needs
# an 8-byte end mark. A host longer than about 46 characters, or many hosts on one address, make `nginx -t`
# fail at the defaults ("could not build server_names_hash"), so the document sizes them.
_HASH_BUCKET_DEFAULT = 64
_HASH_BUCKET_LIMIT = 65536 - 128   # nginx refuses a bucket over 65536 minus its cache line
_HASH_MAX_DEFAULT = 512


def _name_bytes(host: str) -> int:
    return 8 + (len(host) + 2 + 7) // 8 * 8


def server_names_hash(release: Release) -> str:
    """Directives sizing nginx's server-name hash for this document; "" when nginx's defaults hold it.

    The bucket is made large enough for every name on the busiest address, so any table size fits them;
    nginx allocates only what the names use, so a large bucket costs lookups nothing measurable.
    Wildcard names are stored by label in smaller hashes, so counting them whole over-estimates safely.
    """
    per_listen: dict[str, list[str]] = {}
    for svc in release.services:
        per_listen.setdefault(str(svc.listen), []).extend(svc.hosts)
    if not per_listen:
        return ""
    largest = max(_name_bytes(h) for hosts in per_listen.values() for h in hosts or ("",))
    count = max(len(hosts) for hosts in per_listen.values())
    if largest + 8 <= _HASH_BUCKET_DEFAULT and count <= 64:
        return ""
    total = max(sum(_name_bytes(h) for h in hosts) for hosts in per_listen.values())
    bucket = min(_HASH_BUCKET_LIMIT, (total + 8 + 63) // 64 * 64)
    max_size = _HASH_MAX_DEFAULT
    while bucket == _HASH_BUCKET_LIMIT and max_size < 4 * count:
        max_size *= 2
    return (f"# Sized for this document's hosts (nginx's defaults cannot hold them).\n"
            f"server_names_hash_bucket_size {bucket};\nserver_names_hash_max_size {max_size};\n")
