"""Ed25519 signatures on control commands.

The signed bytes are the Avro body of the command with ``signature`` empty and its maps
in key order, so every reader computes them identically. Agent identities hold no
private key; only operators and processors do, so an agent cannot lift its own freeze.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from backout.schemas.codec import encode_body
from backout.schemas.errors import ConfigError, ControlError
from backout.schemas.events import ControlCommand


class SignatureInvalid(ControlError):
    """A control command is unsigned, signed by an unknown key, or its signature is wrong."""


@dataclass(frozen=True)
class SigningKey:
    """A private key and the id readers know its public half by."""

    key_id: str
    private: Ed25519PrivateKey

    @property
    def public_b64(self) -> str:
        """The public key, raw 32 bytes in base64, as ``trusted_keys`` holds it."""
        raw = self.private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return base64.b64encode(raw).decode()

    def private_pem(self) -> bytes:
        """The private key as unencrypted PKCS#8 PEM, with the key id in a comment line."""
        pem = self.private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return f"# backout key id: {self.key_id}\n".encode() + pem


def key_id_for(public_b64: str) -> str:
    """A short, stable id for a public key."""
    return "k_" + hashlib.sha256(public_b64.encode()).hexdigest()[:12]


def new_signing_key() -> SigningKey:
    """A fresh Ed25519 key pair."""
    private = Ed25519PrivateKey.generate()
    raw = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return SigningKey(key_id_for(base64.b64encode(raw).decode()), private)


def load_signing_key(path: Path) -> SigningKey:
    """Read a key written by :meth:`SigningKey.private_pem` (``backout keys new``).

    Raises:
        ConfigError: the file is missing or is not an Ed25519 private key.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read signing key {str(path)!r}: {exc.strerror}") from exc
    body = b"\n".join(line for line in data.splitlines() if not line.startswith(b"#"))
    try:
        private = serialization.load_pem_private_key(body, password=None)
    except ValueError as exc:
        raise ConfigError(f"{str(path)!r} is not a PEM private key") from exc
    if not isinstance(private, Ed25519PrivateKey):
        raise ConfigError(f"{str(path)!r} is not an Ed25519 key")
    raw = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return SigningKey(key_id_for(base64.b64encode(raw).decode()), private)


def signed_bytes(command: ControlCommand) -> bytes:
    """The canonical bytes a signature covers."""
    canonical = command.model_copy(
        update={
            "signature": None,
            "scope": dict(sorted(command.scope.items())),
            "approved_args": (
                dict(sorted(command.approved_args.items()))
                if command.approved_args is not None
                else None
            ),
        }
    )
    return encode_body(canonical)


def sign(command: ControlCommand, key: SigningKey) -> ControlCommand:
    """The command with ``key_id`` set and signed."""
    unsigned = command.model_copy(update={"key_id": key.key_id, "signature": None})
    return unsigned.model_copy(update={"signature": key.private.sign(signed_bytes(unsigned))})


def verify(command: ControlCommand, trusted_keys: dict[str, str]) -> None:
    """Check a command's signature against the trusted public keys.

    Raises:
        SignatureInvalid: unsigned, unknown key id, or a wrong signature.
    """
    if command.signature is None or command.key_id is None:
        raise SignatureInvalid(f"command {command.command_id!r} is unsigned")
    public_b64 = trusted_keys.get(command.key_id)
    if public_b64 is None:
        raise SignatureInvalid(
            f"command {command.command_id!r} is signed by untrusted key {command.key_id!r}"
        )
    try:
        public = Ed25519PublicKey.from_public_bytes(base64.b64decode(public_b64))
        public.verify(command.signature, signed_bytes(command))
    except (InvalidSignature, ValueError) as exc:
        raise SignatureInvalid(
            f"command {command.command_id!r} has a forged or corrupted signature"
        ) from exc
