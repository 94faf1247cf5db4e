"""The installation's Ed25519 signing key, JWS (RFC 7515) with EdDSA (RFC 8037) and the JWKS.

Library: joserfc. It is maintained (the Authlib author's successor to authlib.jose), typed,
implements RFC 7515/7517/7638/8037 on top of `cryptography`, and is strict by default: a
verifier names the algorithms it accepts, so a token cannot choose `none` or an HMAC key.

The signing key is the PEM file `LETHE_SIGNING_KEY`. Unset, a per-installation key is created
on first use at `LETHE_HOME/signing-key.pem` (mode 0600) and reused. The key id is the RFC 7638
thumbprint of the public key, so anyone can recompute it. Retired keys (public or private PEM
files in `LETHE_RETIRED_SIGNING_KEYS`, comma-separated) stay in the JWKS, so what they signed
still verifies after a rotation.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import KeySet, OKPKey

from service.engine import canonical_json

log = logging.getLogger("lethe.signing")

ALG = "EdDSA"
KEY_FILE = "signing-key.pem"


class SignatureError(ValueError):
    """A JWS is malformed, signed by an unknown key, or does not verify."""


def _import_pem(path: Path) -> OKPKey:
    try:
        key = OKPKey.import_key(path.read_bytes())
    except (OSError, ValueError, JoseError) as exc:
        raise SignatureError(f"cannot read the Ed25519 key {path}: {exc}") from None
    if key.as_dict(private=False).get("crv") != "Ed25519":
        raise SignatureError(f"{path} is not an Ed25519 key")
    return key


def _create(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pem = OKPKey.generate_key("Ed25519").as_pem(private=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
        fh.flush()
        os.fsync(fh.fileno())
    try:
        # link() fails if the key exists: processes racing on first use agree on the winner,
        # and nobody ever reads a half-written key.
        os.link(tmp, path)
    except FileExistsError:
        return
    finally:
        tmp.unlink(missing_ok=True)
    log.warning(
        "LETHE_SIGNING_KEY is not set: created a per-installation Ed25519 key at %s (mode "
        "0600); set LETHE_SIGNING_KEY when several hosts sign, and back the key up",
        path,
    )


def kid_of(key: OKPKey) -> str:
    return key.thumbprint()


def public_jwk(key: OKPKey) -> dict[str, Any]:
    return {**key.as_dict(private=False), "kid": kid_of(key), "alg": ALG, "use": "sig"}


@dataclass(frozen=True)
class Signer:
    key: OKPKey
    retired: tuple[OKPKey, ...] = ()

    @property
    def kid(self) -> str:
        return kid_of(self.key)

    def sign(self, payload: dict[str, Any], typ: str) -> str:
        header = {"alg": ALG, "kid": self.kid, "typ": typ}
        body = canonical_json(payload).encode("utf-8")
        # joserfc warns that RFC 9864 prefers "Ed25519"; RFC 8037 "EdDSA" is what every JOSE
        # library verifies today.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return jws.serialize_compact(header, body, self.key, algorithms=[ALG])

    def jwks(self) -> dict[str, Any]:
        keys = [public_jwk(self.key)]
        seen = {self.kid}
        for key in self.retired:
            if kid_of(key) not in seen:
                seen.add(kid_of(key))
                keys.append(public_jwk(key))
        return {"keys": keys}


def load_signer(settings: Any) -> Signer:
    """The signing key (created once when unset) and the retired keys kept for verifying."""
    if settings.signing_key:
        path = Path(settings.signing_key)
    else:
        path = Path(settings.home) / KEY_FILE
        if not path.exists():
            _create(path)
    retired = tuple(
        _import_pem(Path(p.strip())) for p in settings.retired_signing_keys.split(",") if p.strip()
    )
    return Signer(_import_pem(path), retired)


def verify_compact(
    token: str, jwks: dict[str, Any], typ: str | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(protected header, payload) of a compact JWS signed by a key in `jwks`."""
    if not isinstance(token, str) or token.count(".") != 2:
        raise SignatureError("not a compact JWS (three base64url parts separated by '.')")
    try:
        keys = KeySet.import_key_set(jwks)  # type: ignore[arg-type]  # validated by joserfc
    except (JoseError, ValueError, KeyError, TypeError) as exc:
        raise SignatureError(f"invalid JWKS: {exc}") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = jws.extract_compact(token.encode("ascii"))
            header = obj.protected
            kid = header.get("kid")
            if header.get("alg") != ALG:
                raise SignatureError(f"unsupported algorithm {header.get('alg')!r}")
            if not any(k.kid == kid for k in keys.keys):
                raise SignatureError(f"signed by key {kid!r}, which the JWKS does not hold")
            verified = jws.deserialize_compact(token, keys, algorithms=[ALG])
    except SignatureError:
        raise
    except (JoseError, ValueError, UnicodeError) as exc:
        raise SignatureError(f"signature does not verify: {exc}") from None
    if typ is not None and header.get("typ") != typ:
        raise SignatureError(f"expected typ {typ!r}, got {header.get('typ')!r}")
    try:
        payload = json.loads(verified.payload)
    except ValueError:
        raise SignatureError("the payload is not JSON") from None
    return header, payload
