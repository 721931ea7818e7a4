"""`bandgate pki`: the local CA, and certificates for bands, relays, consumers and the server.

Band keys are made on the band: `pki sign` certifies a CSR, and `pki issue` (which makes keys here) is
for tooling and development. Nothing here prints a private key.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from rich.console import Console

from gateway.security.pki import (
    KINDS,
    CertificateAuthority,
    CertInfo,
    Identity,
    LocalState,
    PkiError,
    cert_info,
    default_state_dir,
    ensure_local_state,
    write_cert_and_key,
    write_public,
)

_DEVICE_ARG = re.compile(r"[0-9a-fA-F]{16}")
_MAX_CSR_BYTES = 64 * 1024


def _fail(message: str) -> int:
    """An error for the user: one line on stderr, exit status 2 (never a traceback, never key material)."""
    print(" ".join(message.split()), file=sys.stderr)
    return 2


def _say(console: Console, text: str) -> None:
    """Plain text: no Rich markup in subjects or paths, and no wrapping when output goes to a file."""
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def _positive_days(text: str) -> int:
    try:
        days = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number of days, got {text}") from None
    if days <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return days


def _state_dir(args: argparse.Namespace) -> Path:
    # Resolved when the command runs, not when the parser is built, so the environment of the run counts.
    return args.state_dir if args.state_dir is not None else default_state_dir()


def _load_ca(args: argparse.Namespace) -> CertificateAuthority:
    state = LocalState.at(_state_dir(args))
    if not state.ca_cert.exists() and not state.ca_key.exists():
        raise PkiError(f"no CA in {state.root}; run `bandgate pki init` first (or give --state-dir)")
    return CertificateAuthority.load(state.ca_cert, state.ca_key)


def _identity(kind: str, name: str) -> Identity:
    if kind == "device":
        if not _DEVICE_ARG.fullmatch(name):
            raise PkiError(f"a device name is its ID as 16 hex digits (e.g. 00000000000000ff), not {name!r}")
        name = name.lower()
    return Identity(kind, name)


def _describe(info: CertInfo) -> list[str]:
    who = info.identity
    return [
        f"kind:        {who.kind if who else 'none (no bandgate identity: a server or CA certificate)'}",
        f"name:        {who.name if who else '-'}",
        f"serial:      {info.serial:x}",
        f"sha256:      {info.fingerprint}",
        f"not before:  {info.not_before:%Y-%m-%d %H:%M:%S} UTC",
        f"not after:   {info.not_after:%Y-%m-%d %H:%M:%S} UTC",
        f"subject:     {info.subject}",
        f"issuer:      {info.issuer}",
    ]


def _cmd_init(args: argparse.Namespace, console: Console) -> int:
    """The state a gateway needs: CA, server, operator and local consumer certificates, audit key."""
    root = _state_dir(args)
    try:
        _, created = ensure_local_state(root, args.host or [])
    except (PkiError, OSError) as e:
        return _fail(f"pki init: {e}")
    if not created:
        _say(console, f"{root}: nothing to create")
    for line in created:
        _say(console, f"{root}: created {line}")
    return 0


def _cmd_issue(args: argparse.Namespace, console: Console) -> int:
    """Certificates with keys made here, one pair per NAME (one for all hosts for `server`)."""
    try:
        ca = _load_ca(args)
        if args.kind == "server":
            stem = args.names[0].strip("[]").replace(":", "_")
            label = f"server {' '.join(args.names)}"
            jobs = [(stem, lambda: ca.issue_server(args.names, days=args.days), label)]
        else:
            identities = [_identity(args.kind, name) for name in args.names]
            if len(set(identities)) != len(identities):
                raise PkiError("a name is given twice")
            jobs = [
                (who.name, lambda who=who: ca.issue(who, days=args.days), who.label) for who in identities
            ]
        out_dir: Path = args.out_dir
        if not out_dir.is_dir():
            raise PkiError(f"{out_dir} is not a directory")
        # Every target is checked before anything is written, so a refusal leaves no partial set behind.
        for stem, _, _ in jobs:
            for path in (out_dir / f"{stem}.pem", out_dir / f"{stem}.key"):
                if path.exists():
                    raise PkiError(f"{path} already exists; not overwriting it")
        for stem, make, label in jobs:
            cert, key = make()
            cert_path, key_path = out_dir / f"{stem}.pem", out_dir / f"{stem}.key"
            write_cert_and_key(cert_path, cert, key_path, key, overwrite=False)
            info = cert_info(cert)
            _say(
                console,
                f"{label}: wrote {cert_path} and {key_path} (0600), serial {info.serial:x}, "
                f"until {info.not_after:%Y-%m-%d}",
            )
    except (PkiError, OSError) as e:
        return _fail(f"pki issue: {e}")
    return 0


def _cmd_sign(args: argparse.Namespace, console: Console) -> int:
    """Certify a band's CSR for the identity given here (the CSR cannot choose or widen it)."""
    try:
        identity = _identity(args.kind, args.name)
        with open(args.csr, "rb") as f:
            csr = f.read(_MAX_CSR_BYTES + 1)
        if len(csr) > _MAX_CSR_BYTES:
            raise PkiError(f"{args.csr} is too large to be a CSR")
        cert = _load_ca(args).sign_csr(csr, identity=identity, days=args.days)
        if args.out is None:
            sys.stdout.write(cert.decode("ascii"))
            sys.stdout.flush()
            return 0
        write_public(args.out, cert, overwrite=False)
    except (PkiError, OSError) as e:
        return _fail(f"pki sign: {e}")
    info = cert_info(cert)
    _say(
        console,
        f"{identity.label}: wrote {args.out}, serial {info.serial:x}, until {info.not_after:%Y-%m-%d}",
    )
    return 0


def _cmd_show(args: argparse.Namespace, console: Console) -> int:
    """What a certificate says; a key file is refused, never printed."""
    try:
        with open(args.file, "rb") as f:
            data = f.read(1 << 20)
        info = cert_info(data)
    except (PkiError, OSError) as e:
        return _fail(f"pki show: {args.file}: {e}")
    for line in _describe(info):
        _say(console, line)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `pki` and its subcommands on the `bandgate` command's subparsers."""
    pki = sub.add_parser("pki", help="the local CA and certificates for mutual TLS")
    psub = pki.add_subparsers(dest="pki_command", required=True)

    def state_dir_option(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--state-dir",
            type=Path,
            default=None,
            help="where the CA lives (default: $BANDGATE_STATE_DIR, $XDG_DATA_HOME/bandgate, "
            "~/.local/share/bandgate)",
        )

    ini = psub.add_parser("init", help="create the CA, server and local client certificates, audit key")
    state_dir_option(ini)
    ini.add_argument(
        "--host",
        action="append",
        help="a DNS name or IP the server is reached at, besides localhost (repeatable)",
    )
    ini.set_defaults(run=_cmd_init)

    iss = psub.add_parser("issue", help="a certificate and a key made here per NAME (tooling, development)")
    iss.add_argument("kind", choices=[*KINDS, "server"])
    iss.add_argument(
        "names",
        nargs="+",
        metavar="NAME",
        help="device: 16 hex digits; relay/consumer: [a-z0-9][a-z0-9._-]*; server: DNS names and IPs",
    )
    state_dir_option(iss)
    iss.add_argument("--out-dir", type=Path, default=Path("."), help="where NAME.pem and NAME.key go")
    iss.add_argument("--days", type=_positive_days, default=365)
    iss.set_defaults(run=_cmd_issue)

    sig = psub.add_parser("sign", help="certify a CSR made on the device, for the identity given here")
    sig.add_argument("csr", type=Path, metavar="CSR")
    sig.add_argument("--kind", required=True, choices=list(KINDS))
    sig.add_argument("--name", required=True)
    state_dir_option(sig)
    sig.add_argument("--out", type=Path, help="certificate file to write (default: stdout)")
    sig.add_argument("--days", type=_positive_days, default=365)
    sig.set_defaults(run=_cmd_sign)

    shw = psub.add_parser("show", help="what a certificate says (never a key)")
    shw.add_argument("file", type=Path, metavar="FILE")
    shw.set_defaults(run=_cmd_show)
