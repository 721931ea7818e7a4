"""The `bandgate` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def _fail(message: str) -> int:
    """An error for the user: one line on stderr, exit status 2 (never a traceback, never sample values)."""
    print(message, file=sys.stderr)
    return 2


def _progress(label: str, console: Console) -> Progress:
    """A progress bar on a terminal; nothing when output goes to a file or a pipe."""
    return Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=not console.is_terminal,
        transient=True,
    )


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def _cmd_simulate(args: argparse.Namespace, console: Console) -> int:
    from gateway.simulator.recorder import simulate_to_file

    if (args.out is None) == (args.target is None):
        return _fail("simulate: give exactly one of --out FILE or --target HOST:PORT")
    if args.target is not None:
        return _simulate_target(args, console)
    with _progress("simulating bands", console) as bar:
        task = bar.add_task("bands", total=args.bands)
        summary = simulate_to_file(args.out, **_fleet_options(args), progress=lambda n: bar.advance(task, n))
    console.print(
        f"wrote {summary.batches} batches of {summary.bands} bands to {args.out} "
        f"({summary.samples:,} samples, "
        f"{summary.wire_bytes / max(summary.samples, 1):.2f} bytes/sample on the wire); "
        f"ground truth in {args.out}.truth.npz"
    )
    return 0


def _fleet_options(args: argparse.Namespace) -> dict:
    """The simulated fleet `simulate` describes, the same for --out and --target."""
    return {
        "bands": args.bands,
        "minutes": args.minutes,
        "seed": args.seed,
        "scenario": args.scenario,
        "sample_rate_hz": args.band_hz,
        "frame_seconds": args.frame_seconds,
        "batch_minutes": args.batch_minutes,
    }


def _simulate_target(args: argparse.Namespace, console: Console) -> int:
    """Bands as gRPC clients, one stream each, paced by `--speedup` (0: as fast as the gateway acks)."""
    import asyncio

    import grpc

    from gateway.privacy.client import give_consent
    from gateway.security.client import channel_from_args, enrol_device
    from gateway.simulator.client import run_fleet
    from gateway.simulator.recorder import fleet_batches

    fleet = [(rec.device_id, batches) for rec, batches in fleet_batches(**_fleet_options(args))]
    interval_s = args.batch_minutes * 60 / args.speedup if args.speedup > 0 else 0.0

    async def enrol() -> dict:
        """Each band registered with the operator credential, its certificate from the gateway's CA; then,
        as the band's owner on first use, an adult profile and consent to every family (self-service)."""
        if args.insecure:
            async with grpc.aio.insecure_channel(args.target) as channel:
                for device_id, _ in fleet:
                    await give_consent(channel, device_id, insecure=True)
            return {}
        room = asyncio.Semaphore(32)  # bands enrol side by side, as a fleet coming online does

        async def one(channel: grpc.aio.Channel, device_id: int) -> grpc.ChannelCredentials:
            async with room:
                creds = (await enrol_device(channel, device_id)).credentials()
                async with grpc.aio.secure_channel(args.target, creds) as band:
                    await give_consent(band, device_id)
                return creds

        async with channel_from_args(args, "operator") as channel:
            enrolled = await asyncio.gather(*(one(channel, d) for d, _ in fleet))
        return dict(zip((d for d, _ in fleet), enrolled, strict=True))

    try:
        credentials = asyncio.run(enrol())
    except FileNotFoundError as e:
        return _fail(f"simulate: {e}")
    except grpc.aio.AioRpcError as e:
        return _fail(f"simulate: registering the bands and their consent: {e.code().name}: {e.details()}")
    with _progress("batches acked", console) as bar:
        task = bar.add_task("acked", total=sum(len(b) for _, b in fleet))
        stats = asyncio.run(
            run_fleet(
                args.target,
                fleet,
                interval_s=interval_s,
                on_ack=lambda _: bar.advance(task, 1),
                credentials=credentials or None,
            )
        )
    refused: dict[str, int] = {}
    for s in stats:
        for code, n in s.refused.items():
            refused[code] = refused.get(code, 0) + n
    for s in stats:
        console.print(f"device {s.device_id:016x}")
    console.print(
        f"{len(stats)} bands: {sum(s.batches for s in stats)} batches, "
        f"{sum(s.stored for s in stats)} stored, "
        f"{sum(s.duplicates for s in stats)} duplicates, {sum(s.resent for s in stats)} resent, "
        f"{sum(s.reconnects for s in stats)} reconnects" + (f", refused {refused}" if refused else "")
    )
    return 1 if refused else 0


def _cmd_serve(args: argparse.Namespace, console: Console) -> int:
    from gateway.config import ConfigError, load_config
    from gateway.logs import configure_logging, exit_now
    from gateway.server import serve
    from gateway.supervisor import start_errors

    try:
        config = load_config(
            file=args.config,
            overrides={
                "listen": args.listen,
                "store": args.store,
                "stream": args.stream,
                "metrics_listen": args.metrics_listen,
                "state_dir": args.state_dir,
                "token_listen": args.token_listen,
                "health_listen": args.health_listen,
                "server_names": args.server_names,
                "region": args.region,
                "insecure": True if args.insecure else None,
                "auto_register": True if args.auto_register else None,
                "workers": args.workers,
                "token_process": True if args.token_process else None,
            },
        )
    except ConfigError as e:
        return _fail(f"serve: {e}")
    configure_logging()
    try:
        if config.workers > 1 or config.token_process:
            from gateway.supervisor import supervise

            code = supervise(config)
        else:
            code = serve(config)
    except start_errors() as e:
        return _fail(f"serve: {e}")
    exit_now(code)  # ended (drained, or gave up): the interpreter's teardown would only delay a restart


def _cmd_warm(args: argparse.Namespace, console: Console) -> int:
    """Compile every kernel into the Numba cache (NUMBA_CACHE_DIR), so `serve` starts warm."""
    from gateway.warm import warm

    done = warm()
    console.print(f"kernels warm ({', '.join(done['families'])}) in {done['seconds']} s")
    return 0


def _cmd_health(args: argparse.Namespace, console: Console) -> int:
    """gRPC health of a gateway: prints the status; exit 0 only when SERVING (a container HEALTHCHECK)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with grpc.insecure_channel(args.target) as channel:  # the plaintext loopback health listener
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
    except grpc.RpcError as e:
        return _fail(f"health: {e.code().name}: {e.details()}")
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(status)
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def _cmd_tail(args: argparse.Namespace, console: Console) -> int:
    """Subscribe and print one JSON line a record, with its cursor (resume with --from CURSOR)."""
    import asyncio
    import json

    import grpc

    from bandgate.v1 import features_pb2, features_pb2_grpc
    from gateway.security.client import channel_from_args

    async def tail() -> int:
        request = features_pb2.SubscribeRequest(
            families=args.family or [],
            device=args.device or "",
            from_cursor=args.from_cursor,
            no_follow=args.no_follow,
        )
        async with channel_from_args(args, "consumer") as channel:
            async for rec in features_pb2_grpc.FeatureServiceStub(channel).Subscribe(request):
                values = {k: getattr(v, v.WhichOneof("kind")) for k, v in rec.values.items()}
                line = {
                    "cursor": rec.cursor,
                    "family": rec.family,
                    "device": rec.device,
                    "start_us": rec.start_us,
                    "duration_s": rec.duration_s,
                    "algo": rec.algo,
                    "values": values,
                }
                sys.stdout.write(json.dumps(line, separators=(",", ":")) + "\n")
                sys.stdout.flush()
        return 0

    try:
        return asyncio.run(tail())
    except grpc.aio.AioRpcError as e:
        return _fail(f"tail: {e.code().name}: {e.details()}")
    except BrokenPipeError:
        raise
    except OSError as e:  # a credential file that is missing or unreadable
        return _fail(f"tail: {e}")
    except KeyboardInterrupt:
        return 0


def _cmd_dict_train(args: argparse.Namespace, console: Console) -> int:
    from decoder.batch import BatchDecompressor, BatchError, train_dictionary
    from gateway.batchfile import BatchFileError, read_batches

    decompressor = BatchDecompressor()
    samples: list[bytes] = []
    try:
        for path in args.files:
            for batch in read_batches(path):
                samples.append(decompressor.decompress(batch.payload, dict_id=batch.dict_id).tobytes())
    except (BatchFileError, BatchError, OSError) as e:
        return _fail(f"dict train: {e}")
    try:
        dictionary = train_dictionary(samples, size=args.size)
    except Exception as e:  # zstd's trainer refuses too few or too uniform samples
        return _fail(f"dict train: {e}")
    args.out.write_bytes(dictionary.as_bytes())
    console.print(
        f"dictionary {dictionary.dict_id()} ({len(dictionary.as_bytes())} bytes, "
        f"{len(samples)} batches) -> {args.out}"
    )
    return 0


def _cmd_replay(args: argparse.Namespace, console: Console) -> int:
    from decoder.batch import BatchError
    from gateway import replay
    from gateway.batchfile import BatchFileError
    from gateway.recording import RecordingError

    out = sys.stdout
    try:
        if args.epochs:
            records = replay.replay_epochs(
                args.file, device_id=replay.parse_device(args.device), start_us=replay.parse_start(args.start)
            )
        else:
            if args.rate_hz is None and not replay.is_batch_file(args.file):
                return _fail("replay: --rate-hz is required for a CSV recording")
            records = replay.replay_file(
                args.file,
                rate_hz=args.rate_hz,
                band_hz=args.band_hz,
                columns=tuple(c.strip() for c in args.columns.split(",")),
                device_id=replay.parse_device(args.device),
                start_us=replay.parse_start(args.start),
            )
        writer = replay.write_jsonl if args.format == "jsonl" else replay.write_csv
        writer(records, out)
    except BrokenPipeError:
        raise
    except (RecordingError, BatchFileError, BatchError, ValueError, OSError) as e:
        return _fail(f"replay: {e}")
    return 0


def _not_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"a cursor is >= 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from gateway.privacy import client as privacy_client
    from gateway.privacy import stats_cli
    from gateway.security import admin_cli, audit_cli, pki_cli
    from gateway.security.client import add_client_arguments

    parser = argparse.ArgumentParser(prog="bandgate", description="Edge telemetry gateway for smart bands.")
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser("simulate", help="simulated bands: to a batch file, or as gRPC clients of a gateway")
    sim.add_argument(
        "--out", type=Path, help="batch file to write (format: docs/wire-format.md, 'Batch files')"
    )
    sim.add_argument("--target", help="gateway HOST:PORT: every band uploads over its own stream")
    sim.add_argument("--state-dir", help="state dir of the local operator credential (default: as serve)")
    sim.add_argument("--cert", type=Path, help="admin client certificate (PEM) to register the bands with")
    sim.add_argument("--key", type=Path, help="its private key (PEM)")
    sim.add_argument("--ca", type=Path, help="CA bundle that signed the gateway's certificate (PEM)")
    sim.add_argument("--insecure", action="store_true", help="plaintext, for `serve --insecure`")
    sim.add_argument(
        "--speedup",
        type=float,
        default=0.0,
        help="with --target: simulated time / real time (0: send as fast as acks come back)",
    )
    sim.add_argument("--bands", type=_positive(int), default=1)
    sim.add_argument("--minutes", type=_positive(float), default=10.0)
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--scenario", choices=["day", "night", "mixed"], default="mixed")
    sim.add_argument("--band-hz", type=int, choices=[25, 50], default=50)
    sim.add_argument("--frame-seconds", type=_positive(int), default=60)
    sim.add_argument("--batch-minutes", type=_positive(int), default=10)
    sim.set_defaults(run=_cmd_simulate)

    srv = sub.add_parser("serve", help="run the gateway (gRPC ingest, feature subscriptions, metrics)")
    srv.add_argument("--listen", help="HOST:PORT to serve gRPC on (default 127.0.0.1:50051)")
    srv.add_argument("--store", help="store URL (default sqlite:///bandgate.db)")
    srv.add_argument(
        "--stream",
        help="feature stream URL, nats://[user:password@]host:port[?prefix=p] (default: none)",
    )
    srv.add_argument("--metrics-listen", help="HOST:PORT for Prometheus /metrics (default: off)")
    srv.add_argument("--config", type=Path, help="TOML file of settings (gateway/config.py names them)")
    srv.add_argument(
        "--state-dir", help="credentials and keys (default $BANDGATE_STATE_DIR or ~/.local/share/bandgate)"
    )
    srv.add_argument(
        "--token-listen", help="HOST:PORT for bearer-token clients over TLS (default 127.0.0.1:50052)"
    )
    srv.add_argument(
        "--health-listen", help="loopback HOST:PORT for plaintext gRPC health (default 127.0.0.1:50050)"
    )
    srv.add_argument(
        "--server-names",
        help="extra DNS names/IPs, comma-separated, for the development server certificate",
    )
    srv.add_argument(
        "--region",
        help="the region this gateway serves (regions, region_default: config file or BANDGATE_*; "
        "docs/deployment.md)",
    )
    srv.add_argument(
        "--insecure", action="store_true", help="plaintext on a loopback address: development only"
    )
    srv.add_argument(
        "--auto-register",
        action="store_true",
        help="register unknown devices whose certificate the CA signed",
    )
    srv.add_argument(
        "--workers",
        type=_positive(int),
        help="serving processes on the one port (SO_REUSEPORT), each with its own compute workers "
        "(default 1; docs/operations.md)",
    )
    srv.add_argument(
        "--token-process",
        action="store_true",
        help="serve the token listener from a process of its own, so that a flood of bad tokens cannot "
        "slow the mutual-TLS bands (docs/security.md)",
    )
    srv.set_defaults(run=_cmd_serve)

    tl = sub.add_parser("tail", help="follow stored feature records (jsonl, with cursors)")
    add_client_arguments(tl)
    tl.add_argument("--family", action="append", help="a family to receive (repeatable; default all granted)")
    tl.add_argument("--device", help="one device (16 hex digits)")
    tl.add_argument(
        "--from", dest="from_cursor", type=_not_negative, default=0, help="resume after this cursor (>= 0)"
    )
    tl.add_argument("--no-follow", action="store_true", help="stop after catching up")
    tl.set_defaults(run=_cmd_tail)

    wrm = sub.add_parser("warm", help="compile every Numba kernel into the cache (NUMBA_CACHE_DIR)")
    wrm.set_defaults(run=_cmd_warm)

    hlt = sub.add_parser("health", help="gRPC health check of a gateway; exit 0 when SERVING")
    hlt.add_argument(
        "--target",
        default="127.0.0.1:50050",
        help="the gateway's plaintext health HOST:PORT (its health_listen)",
    )
    hlt.add_argument("--service", default="", help="service name (default: the whole server)")
    hlt.add_argument("--timeout", type=_positive(float), default=3.0, help="seconds")
    hlt.set_defaults(run=_cmd_health)

    rep = sub.add_parser("replay", help="a recording through the band encoder, decoder and feature path")
    rep.add_argument(
        "file", type=Path, help="CSV or CSV.gz in g, a `simulate --out` batch file, or --epochs CSV"
    )
    rep.add_argument("--rate-hz", type=_positive(float), help="the CSV's sample rate (15-500 Hz)")
    rep.add_argument("--band-hz", type=int, choices=[25, 50], default=50, help="the band to replay as")
    rep.add_argument("--columns", default="x,y,z", help="accelerometer columns, and optionally heart rate")
    rep.add_argument("--device", default="1", help="device ID (decimal or 0x-hex)")
    rep.add_argument(
        "--start", default="2026-01-01T00:00:00Z", help="UTC time of the first sample (ISO 8601)"
    )
    rep.add_argument("--format", choices=["jsonl", "csv"], default="jsonl")
    rep.add_argument(
        "--epochs",
        action="store_true",
        help="per-epoch input (epoch,time_s,hr_bpm,counts): sleep periods and stages",
    )
    rep.set_defaults(run=_cmd_replay)

    privacy_client.add_parsers(sub)
    pki_cli.add_parser(sub)
    admin_cli.add_parser(sub)
    audit_cli.add_parser(sub)
    stats_cli.add_parser(sub)

    dct = sub.add_parser("dict", help="zstd dictionaries")
    dsub = dct.add_subparsers(dest="dict_command", required=True)
    train = dsub.add_parser("train", help="train a zstd dictionary from batch files")
    train.add_argument("files", nargs="+", type=Path)
    train.add_argument("--out", type=Path, required=True, help="dictionary file to write")
    train.add_argument("--size", type=_positive(int), default=16 * 1024, help="dictionary size in bytes")
    train.set_defaults(run=_cmd_dict_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args, Console(stderr=False))
    except BrokenPipeError:  # `bandgate replay … | head`: the reader left, nothing is wrong
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
