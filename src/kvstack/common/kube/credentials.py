"""Where the API server is and who we are to it: in-cluster service account, or a kubeconfig.

:func:`load_credentials` picks like client-go: a kubeconfig when one (or a context) is named, else
the pod's service account when ``KUBERNETES_SERVICE_HOST`` is set, else ``$KUBECONFIG`` (a
``:``-separated list, first value wins) or ``~/.kube/config``. Loading does file I/O only; tokens are
fetched per request through a :class:`TokenSource`, so a rotated service-account token file, a
kubeconfig ``tokenFile`` and an exec plugin's expiring token are all picked up without reloading.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import os
import ssl
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import yaml

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
# An exec plugin's token is fetched again this long before it expires.
EXPIRY_MARGIN = dt.timedelta(seconds=30)


class KubeConfigError(ValueError):
    """Credentials cannot be loaded; the message names the file and the field."""


class TokenSource(Protocol):
    async def token(self) -> str | None:
        """The bearer token for the next request (may read a file or run a plugin)."""
        ...

    def invalidate(self) -> None:
        """The server answered 401: the next :meth:`token` must not reuse a cached one."""
        ...


@dataclass(slots=True)
class StaticToken:
    value: str | None

    async def token(self) -> str | None:
        return self.value

    def invalidate(self) -> None:
        pass


@dataclass(slots=True)
class TokenFile:
    """A token file, read again whenever it changes (the kubelet swaps a rotated token in)."""

    path: Path
    _seen: tuple[int, int, int] | None = None
    _value: str | None = None

    async def token(self) -> str | None:
        st = self.path.stat()  # follows the kubelet's ..data symlink swap
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if key != self._seen:
            self._value = self.path.read_text().strip() or None
            self._seen = key
        return self._value

    def invalidate(self) -> None:
        self._seen = None


@dataclass(slots=True)
class ExecPlugin:
    """A kubeconfig ``exec`` credential plugin (``client.authentication.k8s.io``), run on demand.

    Its token is kept until ``expirationTimestamp`` (less :data:`EXPIRY_MARGIN`) or a 401.
    """

    command: str
    args: tuple[str, ...]
    env: Mapping[str, str]
    api_version: str
    cwd: Path
    _value: str | None = None
    _expires: dt.datetime | None = None
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def token(self) -> str | None:
        async with self._lock:  # concurrent requests start the plugin once
            now = dt.datetime.now(dt.UTC)
            if self._value is None or (self._expires is not None and now >= self._expires - EXPIRY_MARGIN):
                self._value, self._expires = await self._run()
            return self._value

    def invalidate(self) -> None:
        self._value = None

    async def _run(self) -> tuple[str, dt.datetime | None]:
        info = {"apiVersion": self.api_version, "kind": "ExecCredential", "spec": {"interactive": False}}
        proc = await asyncio.create_subprocess_exec(
            self.command,
            *self.args,
            env={**os.environ, **self.env, "KUBERNETES_EXEC_INFO": json.dumps(info)},
            cwd=self.cwd,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        if proc.returncode != 0:
            raise KubeConfigError(
                f"exec plugin {self.command} failed ({proc.returncode}): {err.decode()[:400]}"
            )
        try:
            status = json.loads(out)["status"]
        except (ValueError, KeyError, TypeError) as exc:
            raise KubeConfigError(
                f"exec plugin {self.command}: not an ExecCredential: {out[:200]!r}"
            ) from exc
        if "clientCertificateData" in status:
            raise KubeConfigError(
                f"exec plugin {self.command}: client certificates from plugins are unsupported"
            )
        token = status.get("token")
        if not isinstance(token, str) or not token:
            raise KubeConfigError(f"exec plugin {self.command}: ExecCredential has no status.token")
        expires = status.get("expirationTimestamp")
        return token, dt.datetime.fromisoformat(expires.replace("Z", "+00:00")) if expires else None


@dataclass(frozen=True, slots=True)
class Pem:
    """A PEM from a file or inline data (kubeconfig ``...-data`` fields)."""

    path: Path | None = None
    data: bytes | None = None

    def read(self) -> bytes:
        if self.data is not None:
            return self.data
        assert self.path is not None
        return self.path.read_bytes()


@dataclass(frozen=True, slots=True)
class Credentials:
    """One API server and how to authenticate to it."""

    server: str
    token: TokenSource
    namespace: str = "default"
    ca: Pem | None = None
    client_cert: Pem | None = None
    client_key: Pem | None = None
    insecure: bool = False
    username: str | None = None
    password: str | None = None
    source: str = ""  # where they came from, for errors and logs

    def ssl_context(self) -> ssl.SSLContext | bool:
        """What ``httpx`` verifies the server with (False for plain http)."""
        if not self.server.startswith("https://"):
            return False
        ctx = ssl.create_default_context(cadata=self.ca.read().decode() if self.ca else None)
        if self.insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if self.client_cert is not None and self.client_key is not None:
            _load_cert_chain(ctx, self.client_cert, self.client_key)
        return ctx


def _load_cert_chain(ctx: ssl.SSLContext, cert: Pem, key: Pem) -> None:
    if cert.path is not None and key.path is not None:
        ctx.load_cert_chain(cert.path, key.path)
        return
    # ssl only loads a key pair from files: inline data goes through a private directory, removed at once
    with tempfile.TemporaryDirectory(prefix="kvstack-kube-") as tmp:
        cert_file, key_file = Path(tmp) / "tls.crt", Path(tmp) / "tls.key"
        cert_file.write_bytes(cert.read())
        key_file.touch(mode=0o600)
        key_file.write_bytes(key.read())
        ctx.load_cert_chain(cert_file, key_file)


def load_credentials(
    kubeconfig: Path | None = None,
    context: str | None = None,
    *,
    service_account_dir: Path = SERVICE_ACCOUNT_DIR,
    environ: Mapping[str, str] = os.environ,
) -> Credentials:
    """See the module docstring for the order; raises :class:`KubeConfigError`."""
    if kubeconfig is None and context is None and environ.get("KUBERNETES_SERVICE_HOST"):
        return in_cluster(service_account_dir, environ)
    if kubeconfig is not None:
        paths = [kubeconfig]
    elif environ.get("KUBECONFIG"):
        paths = [Path(p) for p in environ["KUBECONFIG"].split(os.pathsep) if p]
    else:
        paths = [Path.home() / ".kube" / "config"]
    return from_kubeconfig(paths, context)


def in_cluster(directory: Path = SERVICE_ACCOUNT_DIR, environ: Mapping[str, str] = os.environ) -> Credentials:
    """The pod's service account: token (re-read as it rotates), CA and namespace files in ``directory``."""
    host, port = environ.get("KUBERNETES_SERVICE_HOST"), environ.get("KUBERNETES_SERVICE_PORT", "443")
    if not host:
        raise KubeConfigError("in-cluster: KUBERNETES_SERVICE_HOST is not set")
    token_file = directory / "token"
    if not token_file.is_file():
        raise KubeConfigError(f"in-cluster: no service-account token at {token_file}")
    try:
        namespace = (directory / "namespace").read_text().strip() or "default"
    except OSError:
        namespace = "default"
    ca_file = directory / "ca.crt"
    return Credentials(
        server=f"https://{f'[{host}]' if ':' in host else host}:{port}",
        token=TokenFile(token_file),
        namespace=namespace,
        ca=Pem(path=ca_file) if ca_file.is_file() else None,
        source=f"in-cluster service account ({directory})",
    )


def from_kubeconfig(paths: list[Path], context: str | None = None) -> Credentials:
    """Merge the kubeconfig files (first value wins) and resolve ``context`` (default: current)."""
    docs: list[tuple[Path, Mapping[str, Any]]] = []
    for path in paths:
        try:
            doc = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            if len(paths) > 1 and isinstance(err, FileNotFoundError):
                continue  # client-go skips missing files of a $KUBECONFIG list
            raise KubeConfigError(f"kubeconfig {path}: {err}") from err
        if not isinstance(doc, Mapping):
            raise KubeConfigError(f"kubeconfig {path}: not a mapping")
        docs.append((path, doc))
    if not docs:
        raise KubeConfigError(f"no kubeconfig among {[str(p) for p in paths]}")
    where = ", ".join(str(p) for p, _ in docs)
    name = context or next((d["current-context"] for _, d in docs if d.get("current-context")), None)
    if not name:
        raise KubeConfigError(f"kubeconfig {where}: no context named and no current-context")
    ctx_base, ctx = _named(docs, "contexts", "context", name, where)
    cluster_base, cluster = _named(docs, "clusters", "cluster", ctx.get("cluster"), where)
    user_base, user = (
        _named(docs, "users", "user", ctx.get("user"), where) if ctx.get("user") else (ctx_base, {})
    )
    server = cluster.get("server")
    if not isinstance(server, str) or not server:
        raise KubeConfigError(f"kubeconfig {where}: cluster {ctx.get('cluster')!r} has no server")
    for unsupported in ("auth-provider", "tls-server-name", "proxy-url"):
        if unsupported in user or unsupported in cluster:
            raise KubeConfigError(f"kubeconfig {where}: {unsupported!r} is not supported (context {name!r})")
    return Credentials(
        server=server.rstrip("/"),
        token=_token_source(user, user_base, where),
        namespace=str(ctx.get("namespace") or "default"),
        ca=_pem(cluster, "certificate-authority", cluster_base),
        client_cert=_pem(user, "client-certificate", user_base),
        client_key=_pem(user, "client-key", user_base),
        insecure=bool(cluster.get("insecure-skip-tls-verify")),
        username=user.get("username"),
        password=user.get("password"),
        source=f"kubeconfig {where}, context {name}",
    )


def _named(
    docs: list[tuple[Path, Mapping[str, Any]]], section: str, key: str, name: Any, where: str
) -> tuple[Path, Mapping[str, Any]]:
    """The first entry called ``name`` in ``section``, with the directory its relative paths start from."""
    for path, doc in docs:
        for entry in doc.get(section) or []:
            if isinstance(entry, Mapping) and entry.get("name") == name:
                return path.parent, entry.get(key) or {}
    raise KubeConfigError(f"kubeconfig {where}: no {key} named {name!r} in {section}")


def _pem(entry: Mapping[str, Any], name: str, base: Path) -> Pem | None:
    if entry.get(f"{name}-data"):
        return Pem(data=base64.b64decode(entry[f"{name}-data"]))
    if entry.get(name):
        return Pem(path=base / Path(entry[name]).expanduser())  # an absolute path replaces base
    return None


def _token_source(user: Mapping[str, Any], base: Path, where: str) -> TokenSource:
    if user.get("token"):
        return StaticToken(str(user["token"]))
    if user.get("tokenFile"):
        return TokenFile(base / Path(user["tokenFile"]).expanduser())
    spec = user.get("exec")
    if spec:
        if not spec.get("command"):
            raise KubeConfigError(f"kubeconfig {where}: exec plugin without a command")
        return ExecPlugin(
            command=str(spec["command"]),
            args=tuple(str(a) for a in spec.get("args") or ()),
            env={str(e["name"]): str(e["value"]) for e in spec.get("env") or ()},
            api_version=str(spec.get("apiVersion") or "client.authentication.k8s.io/v1"),
            cwd=base,
        )
    return StaticToken(None)
