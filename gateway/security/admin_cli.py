"""`bandgate admin`: the registry through the gateway's AdminService, with an admin credential (by
default the state dir's local operator). One JSON object a line on stdout; errors are one line on stderr
with exit status 2. A new token is printed once, in the `token` field, and never again."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from bandgate.v1 import admin_pb2, admin_pb2_grpc
from gateway.security.client import add_client_arguments, channel_from_args


def _fail(message: str) -> int:
    print(message, file=sys.stderr)
    return 2


def _json(msg: Any) -> str:
    from google.protobuf.json_format import MessageToDict

    return json.dumps(MessageToDict(msg, preserving_proto_field_name=True), separators=(",", ":"))


async def _call(args: argparse.Namespace) -> list[Any]:
    async with channel_from_args(args, "operator") as channel:
        stub = admin_pb2_grpc.AdminServiceStub(channel)
        c = args.admin_command
        if c == "register":
            request = admin_pb2.RegisterRequest(
                kind=args.kind,
                name=args.name,
                csr_pem=args.csr.read_bytes() if args.csr else b"",
                certificate_pem=args.certificate.read_bytes() if args.certificate else b"",
                issue_token=args.issue_token,
                days=args.days,
            )
            reply = await stub.Register(request)
            if args.out and reply.certificate_pem:
                args.out.write_bytes(reply.certificate_pem)
                reply.certificate_pem = b""
            return [reply]
        if c == "revoke":
            return [
                await stub.Revoke(
                    admin_pb2.RevokeRequest(
                        kind=args.kind, name=args.name, credential_id=args.credential or ""
                    )
                )
            ]
        if c in ("bind", "unbind"):
            request = admin_pb2.BindRequest(relay=args.relay, device=args.device)
            return [await (stub.Bind if c == "bind" else stub.Unbind)(request)]
        if c in ("grant", "ungrant"):
            request = admin_pb2.GrantRequest(
                consumer=args.consumer,
                family=args.family,
                operation=args.operation,
                devices=args.device or [],
            )
            return [await (stub.Grant if c == "grant" else stub.Ungrant)(request)]
        if c == "transfer":
            return [await stub.Transfer(admin_pb2.TransferRequest(device=args.device))]
        reply = await stub.List(admin_pb2.ListRequest(kind=args.kind or ""))
        return list(reply.principals)


def _run(args: argparse.Namespace, console: Any) -> int:
    import grpc

    try:
        replies = asyncio.run(_call(args))
    except grpc.aio.AioRpcError as e:
        return _fail(f"admin {args.admin_command}: {e.code().name}: {e.details()}")
    except OSError as e:
        return _fail(f"admin {args.admin_command}: {e}")
    for reply in replies:
        sys.stdout.write(_json(reply) + "\n")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `bandgate admin` and its subcommands."""
    adm = sub.add_parser(
        "admin", help="devices, relays, consumers, grants, bindings, revocation (admin only)"
    )
    asub = adm.add_subparsers(dest="admin_command", required=True)

    reg = asub.add_parser("register", help="register (or re-activate) a device, relay or consumer")
    reg.add_argument("kind", choices=["device", "relay", "consumer"])
    reg.add_argument("name", help="a device's 16 hex digits, or a relay's or consumer's name")
    reg.add_argument("--csr", type=Path, help="a CSR (PEM) made where the key lives: the gateway signs it")
    reg.add_argument("--certificate", type=Path, help="a certificate issued elsewhere, registered as is")
    reg.add_argument("--issue-token", action="store_true", help="issue a bearer token (shown once)")
    reg.add_argument("--days", type=int, default=0, help="validity of the signed certificate")
    reg.add_argument("--out", type=Path, help="write the signed certificate here instead of into the JSON")

    rev = asub.add_parser("revoke", help="revoke a principal (every credential) or one credential")
    rev.add_argument("kind", choices=["device", "relay", "consumer"])
    rev.add_argument("name")
    rev.add_argument("--credential", help="revoke only this credential id (see `admin list`)")

    for name, text in (("bind", "let a relay upload for a device"), ("unbind", "end a relay's binding")):
        b = asub.add_parser(name, help=text)
        b.add_argument("relay")
        b.add_argument("device")

    for name, text in (("grant", "grant a consumer an operation on a family"), ("ungrant", "remove a grant")):
        g = asub.add_parser(name, help=text)
        g.add_argument("consumer")
        g.add_argument("family", help="a feature family, or * with the admin operation")
        g.add_argument("operation", choices=["subscribe", "export", "admin"])
        g.add_argument("--device", action="append", help="narrow to this device (repeatable)")

    ls = asub.add_parser("list", help="principals with their credentials, bindings and grants")
    ls.add_argument("--kind", choices=["device", "relay", "consumer"])

    tr = asub.add_parser("transfer", help="a resold band: a new ownership; the last owner's data stays")
    tr.add_argument("device", help="16 hex digits")

    for p in (reg, rev, ls, tr, *[asub.choices[n] for n in ("bind", "unbind", "grant", "ungrant")]):
        add_client_arguments(p)
        p.set_defaults(run=_run)

    from gateway.security import dbgrants  # no gateway call: the registry from the store, SQL to a DBA

    dbgrants.add_parser(asub)


__all__ = ["add_parser"]
