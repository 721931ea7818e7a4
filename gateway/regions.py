"""Home regions: each band's data stays in its home region (docs/deployment.md, "Two regions").

A gateway serves one region (`region`). A band's or relay's home region is the one its certificate
carries (`bandgate-region:<name>`, stamped by the CA of the gateway that enrolled it: pki.py), or, for a
certificate from before regions, `region_default`; never where it first connects. A stream whose caller
belongs elsewhere is refused before anything about it is registered, computed or stored, with
FAILED_PRECONDITION and two trailers that tell the band where to go:

    bandgate-home-region   the home region's name
    bandgate-home-address  its public address (`regions`: "eu=eu.bandgate.example:443,us=...")

Bearer-token callers carry no certificate: their token is registered in their home region's registry
only, so elsewhere it is unknown (UNAUTHENTICATED).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.security.pki import PkiError, cert_info, check_region

HOME_REGION_TRAILER = "bandgate-home-region"
HOME_ADDRESS_TRAILER = "bandgate-home-address"


def parse_regions(text: str) -> dict[str, str]:
    """`name=address,…` as a dict; ValueError naming the bad part."""
    out: dict[str, str] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, sep, address = (x.strip() for x in part.partition("="))
        if not sep or not address:
            raise ValueError(f"regions: {part!r} is not name=address")
        try:
            check_region(name)
        except PkiError as e:
            raise ValueError(f"regions: {e}") from None
        if name in out:
            raise ValueError(f"regions: {name} is listed twice")
        out[name] = address
    return out


@dataclass(frozen=True)
class Misrouted:
    """A caller whose home is another region: the refusal's reason and trailers."""

    home: str
    address: str

    @property
    def reason(self) -> str:
        where = f" at {self.address}" if self.address else ""
        return f"this gateway serves another region; the home region of this band is {self.home}{where}"

    @property
    def trailers(self) -> tuple[tuple[str, str], ...]:
        return ((HOME_REGION_TRAILER, self.home), (HOME_ADDRESS_TRAILER, self.address))


@dataclass(frozen=True)
class Regions:
    """This gateway's region and where the others are. `here` empty: one region, nothing checked."""

    here: str = ""
    addresses: dict[str, str] = field(default_factory=dict)
    default: str = ""  # the home of certificates without a region ("" = none: they are refused)

    @classmethod
    def from_settings(cls, region: str, regions: str, default: str) -> Regions:
        addresses = parse_regions(regions)
        for what, name in (("region", region), ("region_default", default)):
            if name:
                try:
                    check_region(name)
                except PkiError as e:
                    raise ValueError(f"{what}: {e}") from None
                if addresses and name not in addresses:
                    raise ValueError(f"{what}: {name} is not one of regions ({', '.join(addresses)})")
        if (addresses or default) and not region:
            raise ValueError("region: regions and region_default need this gateway's own region")
        return cls(region, addresses, default)

    def home_of(self, cert_pem: bytes | None) -> str | None:
        """The home region of the caller whose (TLS-verified) certificate is `cert_pem`; None when it has
        none (a token caller, or a certificate from before regions with no `default`)."""
        if cert_pem is None:
            return None
        return cert_info(cert_pem).region or self.default or None

    def check(self, cert_pem: bytes | None) -> Misrouted | None:
        """None if this gateway may serve the caller; else where it belongs. A certificate without a home
        region (and no default) belongs nowhere: refused, with an empty address."""
        if not self.here or cert_pem is None:
            return None
        home = self.home_of(cert_pem)
        if home == self.here:
            return None
        if home is None:
            return Misrouted("none", "")
        return Misrouted(home, self.addresses.get(home, ""))
