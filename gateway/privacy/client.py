"""Client side of the PrivacyService: what a band's companion app does on first use (an adult profile and
consent), and the operator commands `bandgate consent|profile|export|erase --device ID`."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Iterable
from typing import Any

import grpc

from bandgate.v1 import privacy_pb2, privacy_pb2_grpc
from decoder.records import FAMILIES
from gateway.auth import device_metadata
from gateway.security.client import add_client_arguments, channel_from_args

ADULT_BIRTH_YEAR = 1990
ADULT_COUNTRY = "DE"


async def give_consent(
    channel: grpc.aio.Channel,
    device_id: int,
    families: Iterable[str] = FAMILIES,
    *,
    birth_year: int = ADULT_BIRTH_YEAR,
    country: str = ADULT_COUNTRY,
    insecure: bool = False,
) -> privacy_pb2.ConsentState:
    """An adult owner's first use, over the band's own `channel`: a profile (birth year, country), then
    consent to `families`. On an insecure gateway the band names itself in metadata."""
    stub = privacy_pb2_grpc.PrivacyServiceStub(channel)
    device = f"{device_id:016x}"
    metadata = device_metadata(device_id) if insecure else None
    await stub.SetProfile(
        privacy_pb2.SetProfileRequest(
            device=device, profile=privacy_pb2.Profile(birth_year=birth_year, country=country)
        ),
        metadata=metadata,
    )
    return await stub.SetConsent(
        privacy_pb2.SetConsentRequest(device=device, grant=sorted(families)), metadata=metadata
    )


# --- bandgate consent | profile | export | erase (operator) -------------------------------------------------


def _json(msg: Any) -> str:
    from google.protobuf.json_format import MessageToDict

    return json.dumps(
        MessageToDict(msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True),
        separators=(",", ":"),
    )


async def _call(args: argparse.Namespace) -> int:
    async with channel_from_args(args, "operator") as channel:
        stub = privacy_pb2_grpc.PrivacyServiceStub(channel)
        device = args.device.lower()
        c = args.privacy_command
        if c == "consent":
            if args.grant or args.withdraw:
                reply = await stub.SetConsent(
                    privacy_pb2.SetConsentRequest(
                        device=device, grant=args.grant or [], withdraw=args.withdraw or []
                    )
                )
            elif args.guardian:
                reply = await stub.RecordGuardian(
                    privacy_pb2.GuardianRequest(
                        device=device, guardian=args.guardian, withdraw=args.withdraw_guardian
                    )
                )
            else:
                reply = await stub.GetConsent(privacy_pb2.DeviceRequest(device=device))
        elif c == "profile":
            fields = {k: getattr(args, k) for k in ("birth_year", "country", "height_cm", "weight_kg", "sex")}
            given = {k: v for k, v in fields.items() if v is not None}
            if given or args.clear:
                reply = await stub.SetProfile(
                    privacy_pb2.SetProfileRequest(
                        device=device, profile=privacy_pb2.Profile(**given), clear=args.clear or []
                    )
                )
            else:
                reply = await stub.GetProfile(privacy_pb2.DeviceRequest(device=device))
        elif c == "export":
            out = sys.stdout.buffer
            async for chunk in stub.Export(
                privacy_pb2.PrivacyExportRequest(device=device, format=args.format)
            ):
                out.write(chunk.data)
            out.flush()
            return 0
        else:
            reply = await stub.Erase(privacy_pb2.DeviceRequest(device=device))
        sys.stdout.write(_json(reply) + "\n")
        return 0


def _run(args: argparse.Namespace, console: Any) -> int:
    try:
        return asyncio.run(_call(args))
    except grpc.aio.AioRpcError as e:
        sys.stderr.write(f"{args.privacy_command}: {e.code().name}: {e.details()}\n")
        return 2
    except OSError as e:
        sys.stderr.write(f"{args.privacy_command}: {e}\n")
        return 2


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register `bandgate consent`, `profile`, `export` and `erase` (the operator's path, audited)."""
    con = sub.add_parser("consent", help="a device's consent: show, grant, withdraw, or record a guardian's")
    con.add_argument("--grant", action="append", choices=FAMILIES, help="grant a family (repeatable)")
    con.add_argument("--withdraw", action="append", choices=FAMILIES, help="withdraw a family (repeatable)")
    con.add_argument("--guardian", help="record a guardian's consent (a reference, not a name) for a minor")
    con.add_argument("--withdraw-guardian", action="store_true", help="with --guardian: remove it")

    pro = sub.add_parser("profile", help="a device's profile: show, or correct fields")
    pro.add_argument("--birth-year", type=int)
    pro.add_argument("--country", help="ISO 3166-1 alpha-2")
    pro.add_argument("--height-cm", type=float)
    pro.add_argument("--weight-kg", type=float)
    pro.add_argument("--sex", choices=["female", "male", "other"])
    pro.add_argument("--clear", action="append", help="remove a field (repeatable)")

    exp = sub.add_parser("export", help="everything kept about a device's current ownership, on stdout")
    exp.add_argument("--format", choices=["jsonl", "msgpack"], default="jsonl")

    era = sub.add_parser("erase", help="erase a device from every store (its data keys first)")

    for p in (con, pro, exp, era):
        p.add_argument("--device", required=True, help="16 hex digits")
        add_client_arguments(p)
        p.set_defaults(run=_run, privacy_command=p.prog.split()[-1])


__all__ = ["add_parsers", "give_consent"]
