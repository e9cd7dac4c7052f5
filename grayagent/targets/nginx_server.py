"""The `server {}` blocks that nginx reload mode and dynamic mode render alike.

Pure text: a service's server (listen, server names, access log, `location /` around a proxy_pass), the
404 catch-all for ports where every service names hosts, and the agent's loopback-only control server.
"""

from __future__ import annotations

from grayagent.model import Release, Service
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
