"""What every proxy target renders the same way: upstream names and which service answers where.

nginx semantics are the reference: one socket per listen address; a request whose Host matches no
`hosts` entry goes to the listen address's default server, which is the first service listed there, or a
404 when every service there names hosts.
"""

from __future__ import annotations

from grayagent.rules.model import Release, Service


def upstream_id(service: Service, upstream: str) -> str:
    """The proxy-side name of one upstream of one service (an nginx upstream block, an Envoy cluster)."""
    return f"grayagent.{service.name}.{upstream}"


def services_by_listen(release: Release) -> dict[str, list[Service]]:
    """Services grouped by listen address (str(Listen)), both in document order."""
    groups: dict[str, list[Service]] = {}
    for svc in release.services:
        groups.setdefault(str(svc.listen), []).append(svc)
    return groups


def default_service(services: list[Service]) -> Service | None:
    """The service answering unknown hosts on one listen address; None means a 404 catch-all answers."""
    if all(s.hosts for s in services):
        return None
    return services[0]
