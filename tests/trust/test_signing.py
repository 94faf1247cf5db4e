"""The per-installation signing key: processes racing on first use agree on one key, created
with mode 0600; a configured key that is not Ed25519 is refused with a clear error."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest

from service.settings import load_settings
from service.trust.signing import KEY_FILE, SignatureError, load_signer

RACE = (
    "from service.settings import load_settings; from service.trust.signing import load_signer; "
    "import sys; print(load_signer(load_settings(home=sys.argv[1])).kid)"
)


def test_racing_processes_share_one_key(tmp_path: Path) -> None:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACE, str(tmp_path)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]
    kids = {p.communicate(timeout=60)[0].strip() for p in procs}
    assert len(kids) == 1 and all(p.returncode == 0 for p in procs)
    key = tmp_path / KEY_FILE
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert load_signer(load_settings(home=str(tmp_path))).kid == kids.pop()
    assert [p.name for p in tmp_path.iterdir()] == [KEY_FILE]  # no temp files left


def test_configured_key_must_be_ed25519(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path = tmp_path / "ec.pem"
    path.write_bytes(pem)
    with pytest.raises(SignatureError, match="Ed25519"):
        load_signer(load_settings(home=str(tmp_path), signing_key=str(path)))
