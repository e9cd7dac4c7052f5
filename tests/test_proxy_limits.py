"""Issue 12 item 6: documents that validation accepts, nginx accepts too; `publish --check` asks the proxies.

Real nginx (`nginx -t`) and real Envoy (`envoy --mode validate`), through grayagent.proxycheck, which
`publish --check` runs.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from grayagent import proxycheck, usecases
from grayagent.errors import InvalidDocument
from grayagent.rules.model import parse_document
from grayagent.stores.file import FileStore
from grayagent.targets import nginx_render
from tests.agenthelp import grayagent
from tests.docs import document, dump, service
from tests.servers.nginx import nginx_binary

LABEL = "a" * 63
HOST_195 = ".".join([LABEL, LABEL, LABEL[:63], "com"])
LONG_WILDCARDS = [f"*.h{i:03d}." + ".".join([LABEL] * 3) for i in range(100)]
LONG_EXACT = [f"h{i:03d}." + ".".join([LABEL] * 3) for i in range(100)]

HOST_CASES = {
    "195-char host": [service(hosts=[HOST_195])],
    "100 long wildcard hosts": [service(hosts=LONG_WILDCARDS)],
    "100 long exact hosts": [service(hosts=LONG_EXACT)],
    "a 50-char host": [service(hosts=["x" * 46 + ".com"])],
    "hosts over many services on one port": [service(name=f"s{i}", hosts=[f"h{i}-{j}." + LABEL for j in range(50)])
                                             for i in range(40)],
}


def _release(services: list[dict]):
    return parse_document(dump(document(*services)), "doc.json")


@pytest.mark.parametrize("case", sorted(HOST_CASES))
def test_nginx_accepts_every_host_set_validation_accepts(case: str) -> None:
    assert len(HOST_195) == 195
    proxycheck.check_nginx(_release(HOST_CASES[case]), "doc.json", nginx_binary())


def test_short_hosts_render_no_hash_directives() -> None:
    """The goldens' documents stay byte-identical: sizing appears only when nginx's defaults cannot hold them."""
    assert nginx_render.server_names_hash(_release([service(hosts=["shop.example.com", "*.example.org"])])) == ""
    assert "server_names_hash_bucket_size" in nginx_render.server_names_hash(_release([service(hosts=[HOST_195])]))


def test_publish_check_nginx_refuses_what_nginx_refuses_and_publishes_nothing(tmp_path: Path, monkeypatch) -> None:
    """Without the sizing, nginx -t refuses a 195-character host; --check must catch that before publishing."""
    path = tmp_path / "doc.json"
    path.write_bytes(dump(document(service(hosts=[HOST_195]))))
    store = FileStore(str(tmp_path / "store"))
    monkeypatch.setattr(nginx_render, "server_names_hash", lambda release: "")
    with pytest.raises(InvalidDocument) as info:
        usecases.publish(store, str(path), "t", "", None, [("nginx", nginx_binary())])
    [problem] = info.value.problems
    assert str(problem).startswith(f"{path}: nginx -t refused it: ") and "server_names_hash" in str(problem)
    assert store.current() is None
    monkeypatch.undo()
    assert usecases.publish(store, str(path), "t", "", None, [("nginx", nginx_binary())]).version == 1


def test_publish_check_through_the_cli(tmp_path: Path) -> None:
    path = tmp_path / "doc.json"
    path.write_bytes(dump(document(service(hosts=LONG_WILDCARDS))))
    store = tmp_path / "store"
    missing = grayagent("publish", str(path), "--store", str(store), "--check", "envoy",
                        "--envoy-bin", str(tmp_path / "no-envoy"))
    assert missing.returncode == 2 and missing.stderr.startswith("grayagent: --check: "), missing.stderr
    assert not (store / "current").exists()
    envoy = shutil.which("envoy") or shutil.which("envoy", path=str(Path(sys.executable).parent))
    argv = ["--check", "nginx", "--nginx-bin", nginx_binary()]
    if envoy is not None:
        argv += ["--check", "envoy", "--envoy-bin", envoy]
    done = grayagent("publish", str(path), "--store", str(store), *argv)
    assert done.returncode == 0 and done.stdout.strip() == "1", done.stderr


@pytest.mark.parametrize("listen, cidr, expected", [
    ("[::ffff:127.0.0.1]:8080", None, "spec.services[0].listen: '[::ffff:127.0.0.1]:8080' is an IPv4-mapped"),
    (8080, "fe80::%eth0/64", "spec.services[0].rules[0].match.sourceCIDRs[0]: fe80::%eth0/64 has a zone index"),
])
def test_documents_nginx_would_refuse_are_refused_before_publish(tmp_path: Path, listen, cidr, expected) -> None:
    rules = [{"name": "r", "match": {"sourceCIDRs": [cidr]}, "to": "canary"}] if cidr else []
    path = tmp_path / "doc.json"
    path.write_bytes(dump(document(service(listen=listen, rules=rules))))
    done = grayagent("publish", str(path), "--store", str(tmp_path / "store"), "--check", "nginx")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1 and lines[0].startswith(f"{path}: {expected}"), done.stderr
    assert not (tmp_path / "store" / "current").exists()


@pytest.mark.parametrize("mode", ["reload", "dynamic"])
def test_a_running_nginx_applies_long_hosts_in_both_modes(tmp_path: Path, mode: str) -> None:
    from grayagent.stores.base import digest_of
    from tests.agenthelp import dynamic_target, nginx_target
    from tests.servers.nginx import NginxInstance, lua_available
    from tests.servers.proc import free_port

    if mode == "dynamic" and not lua_available():
        pytest.skip("lua-nginx-module is not installed")
    content = dump(document(service(listen=f"127.0.0.1:{free_port()}", hosts=[HOST_195, *LONG_WILDCARDS[:99]])))
    nginx = NginxInstance(tmp_path / "nginx", lua=mode == "dynamic").start()
    try:
        target = dynamic_target(nginx) if mode == "dynamic" else nginx_target(nginx)
        release = parse_document(content, "doc.json")
        result = target.apply(target.render(release, 1, digest_of(content)), 1, digest_of(content))
        assert result.ok, result.error
    finally:
        nginx.stop()
