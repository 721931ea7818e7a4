"""The client side of identity: channel credentials from PEM files or the local state dir, and band
enrolment (a key made here, a CSR signed by the gateway through the admin API, so the band's key never
leaves the band).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

from bandgate.v1 import admin_pb2, admin_pb2_grpc
from gateway.security.pki import Identity, LocalState, default_state_dir, key_pem, make_csr, new_key


@dataclass(frozen=True)
class ClientIdentity:
    """A client certificate with its key and the CA bundle that signed the gateway's certificate. No
    secret in its repr."""

    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes

    def __repr__(self) -> str:
        return "ClientIdentity(<certificate>, <key>)"

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.ca_pem, self.key_pem, self.cert_pem)

    @classmethod
    def from_files(cls, cert: Path, key: Path, ca: Path) -> ClientIdentity:
        return cls(Path(cert).read_bytes(), Path(key).read_bytes(), Path(ca).read_bytes())


def local_identity(role: str, state_dir: Path | str | None = None) -> ClientIdentity:
    """The state dir's `operator` or `consumer` (local consumer) credential, as `bandgate serve` made it
    on its first start. FileNotFoundError names the state dir when it has none."""
    state = LocalState.at(Path(state_dir) if state_dir else default_state_dir())
    cert, key = {
        "operator": (state.operator_cert, state.operator_key),
        "consumer": (state.consumer_cert, state.consumer_key),
    }[role]
    for path in (cert, key, state.ca_cert):
        if not path.exists():
            raise FileNotFoundError(
                f"no {path.name} in {state.root}: start `bandgate serve` once (it creates the local "
                "credentials), or pass --state-dir / --cert --key --ca"
            )
    return ClientIdentity.from_files(cert, key, state.ca_cert)


async def enrol_device(channel: grpc.aio.Channel, device_id: int, *, days: int = 0) -> ClientIdentity:
    """Register `device_id` with the admin credential `channel` carries and get its certificate for a key
    made here (what a band's factory provisioning does)."""
    key = new_key()
    identity = Identity.device(device_id)
    reply = await admin_pb2_grpc.AdminServiceStub(channel).Register(
        admin_pb2.RegisterRequest(
            kind="device", name=identity.name, csr_pem=make_csr(key, identity), days=days
        )
    )
    return ClientIdentity(reply.certificate_pem, key_pem(key), reply.ca_pem)


def add_client_arguments(parser, *, target: str = "127.0.0.1:50051") -> None:
    """The options every client command shares: where the gateway is and which credential to use."""
    parser.add_argument("--target", default=target, help=f"gateway HOST:PORT (default {target})")
    parser.add_argument(
        "--state-dir", help="the state dir whose local credentials to use (default: as `bandgate serve`)"
    )
    parser.add_argument("--cert", type=Path, help="client certificate (PEM) instead of the local one")
    parser.add_argument("--key", type=Path, help="its private key (PEM)")
    parser.add_argument("--ca", type=Path, help="CA bundle that signed the gateway's certificate (PEM)")
    parser.add_argument("--token", help="bearer token (for the token listener) instead of a certificate")
    parser.add_argument(
        "--insecure", action="store_true", help="plaintext, for a gateway started with `serve --insecure`"
    )


def channel_from_args(args, role: str) -> grpc.aio.Channel:
    """A channel as the options say: plaintext (--insecure), a token over TLS, the given certificate, or
    the state dir's local `role` credential (operator or consumer)."""
    options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    if args.insecure:
        return grpc.aio.insecure_channel(args.target, options=options)
    if getattr(args, "token", None):
        ca = args.ca.read_bytes() if args.ca else local_ca(args.state_dir)
        creds = grpc.composite_channel_credentials(
            grpc.ssl_channel_credentials(ca), grpc.access_token_call_credentials(args.token)
        )
        return grpc.aio.secure_channel(args.target, creds, options=options)
    if args.cert or args.key:
        if not (args.cert and args.key and args.ca):
            raise FileNotFoundError("--cert, --key and --ca go together")
        identity = ClientIdentity.from_files(args.cert, args.key, args.ca)
    else:
        identity = local_identity(role, args.state_dir)
    return grpc.aio.secure_channel(args.target, identity.credentials(), options=options)


def local_ca(state_dir: Path | str | None) -> bytes:
    state = LocalState.at(Path(state_dir) if state_dir else default_state_dir())
    if not state.ca_cert.exists():
        raise FileNotFoundError(f"no {state.ca_cert.name} in {state.root}: pass --ca")
    return state.ca_cert.read_bytes()


__all__ = [
    "ClientIdentity",
    "add_client_arguments",
    "channel_from_args",
    "enrol_device",
    "local_ca",
    "local_identity",
]
