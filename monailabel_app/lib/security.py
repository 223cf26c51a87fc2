"""Where the server listens: loopback unless authentication is on (or explicitly allowed).

MONAI Label's `start_server` binds 0.0.0.0 when `--host` is not given, and its authentication is
off unless `MONAI_LABEL_AUTH_ENABLE=true`: anyone on the network could then read the patient
images and reports in the datastore. The app refuses that combination at start with a sentence
saying what to do; `make serve` and the docs bind 127.0.0.1.

With authentication on, MONAI Label 0.8.5 validates a bearer token with `jwt.decode(token, key)`
and no `algorithms`, which PyJWT 2 refuses for every token: nobody could use the server.
`fix_token_validation` overrides MONAI Label's `get_current_user` dependency (FastAPI's
`dependency_overrides`) with the same checks plus an explicit list of asymmetric algorithms (the
realm's public key can then not be abused as an HMAC secret).
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Any, Sequence

logger = logging.getLogger(__name__)

# what a Keycloak realm signs with; never HS*: the key we hold is public
TOKEN_ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512"]

MONAI_LABEL_DEFAULT_HOST = "0.0.0.0"


def bind_host_from_argv(argv: Sequence[str]) -> str | None:
    """The --host of a `monailabel start_server` command line (MONAI Label's default when absent),
    or None when this process is not started that way (tests, task subprocesses)."""
    argv = list(argv)
    if "start_server" not in argv:
        return None
    host = MONAI_LABEL_DEFAULT_HOST
    for i, arg in enumerate(argv):
        if arg in ("--host", "-i") and i + 1 < len(argv):
            host = argv[i + 1]
        elif arg.startswith("--host="):
            host = arg.split("=", 1)[1]
    return host


def is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind_host(argv: Sequence[str], allow_remote: bool, auth_enabled: bool) -> str | None:
    """Raise ValueError when the server would listen beyond this machine without authentication."""
    host = bind_host_from_argv(argv)
    if host is None or is_loopback(host) or allow_remote or auth_enabled:
        return host
    raise ValueError(
        f"refusing to serve patient data on --host {host} without authentication: use --host 127.0.0.1 "
        "(MONAI Label's default is 0.0.0.0), or turn on MONAI Label's authentication "
        "(MONAI_LABEL_AUTH_ENABLE=true, see docs/RELIABILITY.md), or pass --conf allow_remote true "
        "if another layer (a VPN, an authenticating reverse proxy) guards the port")


def user_from_token(token: str):
    """MONAI Label's `from_token`, with the signature algorithms named (PyJWT 2 requires them)."""
    import jwt
    from monailabel.config import settings
    from monailabel.endpoints.user import auth

    key = auth.get_public_key(settings.MONAI_LABEL_AUTH_REALM_URI)
    payload = jwt.decode(token, key, algorithms=TOKEN_ALGORITHMS,
                         options={"verify_signature": True, "verify_aud": False, "verify_exp": True})
    roles: Any = payload
    for part in settings.MONAI_LABEL_AUTH_TOKEN_ROLES.split("#"):
        roles = roles.get(part) if isinstance(roles, dict) else None
    return auth.User(username=payload.get(settings.MONAI_LABEL_AUTH_TOKEN_USERNAME),
                     email=payload.get(settings.MONAI_LABEL_AUTH_TOKEN_EMAIL),
                     name=payload.get(settings.MONAI_LABEL_AUTH_TOKEN_NAME),
                     roles=list(roles) if isinstance(roles, (list, tuple)) else [])


def fix_token_validation(fastapi_app: Any) -> bool:
    """Install the working token check on MONAI Label's FastAPI app when auth is on."""
    from monailabel.config import settings

    if not settings.MONAI_LABEL_AUTH_ENABLE:
        return False
    import jwt
    from fastapi import Depends, HTTPException
    from monailabel.endpoints.user import auth

    async def current_user(token: str = Depends(auth.oauth2_scheme)):
        try:
            return user_from_token(token)
        except jwt.InvalidTokenError as exc:
            logger.info("refused a bearer token: %s", exc)
            raise HTTPException(401, detail="Could not validate credentials",
                                headers={"WWW-Authenticate": "Bearer"}) from None
        except Exception as exc:  # noqa: BLE001 - the realm is unreachable or answers nonsense
            logger.error("cannot validate tokens: the realm %s did not give its public key (%s)",
                         settings.MONAI_LABEL_AUTH_REALM_URI, exc)
            raise HTTPException(503, detail="the authentication server cannot be reached") from None

    fastapi_app.dependency_overrides[auth.get_current_user] = current_user
    return True
