"""Show a :class:`LaunchSpec` for ``--dry-run``: shell or JSON, with every secret masked (pure)."""

from __future__ import annotations

import json
import re
import shlex
from urllib.parse import urlsplit, urlunsplit

from kvstack.engine.serve.managed import flag_name
from kvstack.engine.serve.render import LaunchSpec

MASK = "**********"
# Extra env vars whose names say they hold a secret (HF_TOKEN, AWS_SECRET_ACCESS_KEY, ...).
_SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|API_KEY|ACCESS_KEY|PRIVATE_KEY", re.I)


def masked_env(spec: LaunchSpec) -> dict[str, str]:
    """``spec.env`` with secret values replaced by :data:`MASK` and URL passwords hidden."""
    shown: dict[str, str] = {}
    for name, value in spec.env.items():
        if name in spec.secret_env or _SECRET_NAME.search(name):
            shown[name] = MASK
        else:
            shown[name] = mask_url_password(value) if "://" in value else value
    return shown


def mask_url_password(value: str) -> str:
    """``redis://user:pw@host:6379`` -> ``redis://user:**********@host:6379``; other text unchanged."""
    try:
        parts = urlsplit(value)
    except ValueError:
        return value
    if "@" not in parts.netloc:
        return value
    userinfo, _, hosts = parts.netloc.rpartition("@")
    user, sep, _password = userinfo.partition(":")
    if not sep:
        return value
    return urlunsplit(parts._replace(netloc=f"{user}:{MASK}@{hosts}"))


def to_shell(spec: LaunchSpec) -> str:
    """A runnable script: one ``export`` per variable, then ``exec`` of the command, one flag a line."""
    lines = [f"export {name}={shlex.quote(value)}" for name, value in masked_env(spec).items()]
    groups: list[list[str]] = [[]]  # the program and its positionals, then one group per flag
    for arg in spec.argv:
        if flag_name(arg) is not None:
            groups.append([])
        groups[-1].append(arg)
    command = " \\\n    ".join(shlex.join(group) for group in groups)
    lines.append(f"exec {command}")
    return "\n".join(lines)


def to_json(spec: LaunchSpec) -> str:
    """``{"argv": [...], "env": {...}, "masked": [...]}``, for tools."""
    env = masked_env(spec)
    masked = sorted(name for name, value in env.items() if value != spec.env[name])
    return json.dumps({"argv": spec.argv, "env": env, "masked": masked}, indent=2)
