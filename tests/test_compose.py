"""deploy/compose.yaml, the two-region set-up docs/deployment.md describes: no Docker engine here, so this
checks what a typo would break. Every gateway starts with a configuration `bandgate serve` accepts, serves
one region and stores, streams and journals its erasures in that region's services only, and the address
that the other region's gateways send a misrouted band to reaches this region's gateways and is named in
their server certificate."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from gateway.cli import build_parser
from gateway.config import load_config
from gateway.regions import parse_regions

COMPOSE = Path(__file__).resolve().parents[1] / "deploy" / "compose.yaml"
SECRETS = {
    "BANDGATE_KEK": "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=",
    "PG_PASSWORD": "pg-secret",
    "NATS_GATEWAY_PASSWORD": "nats-secret",
    "JS_KEY": "js-secret",
}


def interpolate(value: str) -> str:
    """Compose's `${VAR}` and `${VAR:?message}` with the secrets above (an unknown name fails)."""
    return re.sub(r"\$\{(\w+)(?::\?[^}]*)?\}", lambda m: SECRETS[m.group(1)], value)


def services() -> dict[str, dict]:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def gateways() -> dict[str, dict]:
    return {name: s for name, s in services().items() if s.get("command", [])[:2] == ["bandgate", "serve"]}


def gateway_config(service: dict):
    env = {k: interpolate(str(v)) for k, v in service["environment"].items()}
    args = build_parser().parse_args(service["command"][1:])
    return load_config(environ=env, overrides={"listen": args.listen, "store": args.store})


def test_every_gateway_starts_with_a_valid_configuration_in_one_region_of_two():
    configs = {name: gateway_config(s) for name, s in gateways().items()}
    assert len(configs) >= 4
    regions = {c.region for c in configs.values()}
    assert regions == {"eu", "us"}
    for name, c in configs.items():
        assert parse_regions(c.regions).keys() == regions, name
        assert not c.insecure and c.encrypt_at_rest, name
        assert c.store.startswith("postgresql://") and c.stream.startswith("nats://"), name


def test_a_region_stores_streams_and_journals_in_its_own_services_only():
    all_services = services()
    for name, service in gateways().items():
        c = gateway_config(service)
        host = lambda url: re.match(r"\w+://(?:[^@/]*@)?([^:/?]+)", url).group(1)  # noqa: E731
        assert host(c.store) == f"postgres-{c.region}" in all_services, name
        assert host(c.stream) == f"nats-{c.region}" in all_services, name
        journals = [v for v in service["volumes"] if v.endswith(":" + str(Path(c.erasure_journal).parent))]
        assert journals == [f"journal-{c.region}:/data/journal"], name


def test_the_home_address_of_each_region_reaches_its_gateways_and_is_in_their_certificate():
    all_services = services()
    pki_hosts = {
        all_services["pki"]["command"][i + 1]
        for i, arg in enumerate(all_services["pki"]["command"])
        if arg == "--host"
    }
    for name, service in gateways().items():
        c = gateway_config(service)
        for region, address in parse_regions(c.regions).items():
            alias = address.rsplit(":", 1)[0]
            assert alias in pki_hosts, (name, alias)
            serving = [
                n
                for n, s in gateways().items()
                if alias in s.get("networks", {}).get("default", {}).get("aliases", [])
            ]
            assert serving and all(gateway_config(gateways()[n]).region == region for n in serving), alias
            assert address.rsplit(":", 1)[1] == c.listen.rsplit(":", 1)[1]
