"""Traffic rules in nftables, used when the network config has `"EnableNFTables": true`.

Layout as flannel's (tables `flannel-ipv4` / `flannel-ipv6`, chains `postrtg` and `forward`)::

    table ip flannel-ipv4 {
        comment "rules for flannel-ipv4"
        chain postrtg {                     # only with --ip-masq
            comment "chain to manage traffic masquerading by flannel"
            type nat hook postrouting priority srcnat; policy accept;
            meta mark & 0x4000 == 0x4000 return
            ip saddr <lease> ip daddr <network> return
            ip saddr <network> ip daddr <lease> return
            ip saddr != <network> ip daddr <lease> return
            ip saddr <network> ip daddr != 224.0.0.0/4 masquerade fully-random
            ip saddr != <network> ip daddr <network> masquerade fully-random
        }
        chain forward {                     # with --iptables-forward-rules (default on)
            comment "chain to accept flannel traffic"
            type filter hook forward priority filter; policy accept;
            ip saddr <network> accept
            ip daddr <network> accept
        }
    }

`table ip6 flannel-ipv6` has the same chains (`ip6`, multicast ff00::/8), and is made only when
the config has an IPv6Network (and the masquerade chain only with an IPv6 lease).
Where we differ from flannel, on purpose: the mark rule tests the 0x4000 bit (flannel's nft rule
compares the whole mark to 0x4000; its iptables rule tests the bit, as ours do); the fourth
rule is the iptables one (`! -s <network> -d <lease>`; flannel's nft rule has `saddr !=
<lease> daddr <network>`, which returns host-to-overlay traffic before the last rule can
masquerade it); rules carry the iptables comments ("flanneld masq" / "flanneld forward").

Every change is ONE `nft -f -` transaction holding all tables: `add table` + `delete table`
(so the delete cannot fail) and then the whole table definition. Packets see the old table or
the new one, never an empty or half-built one. `ensure()` compares the tables in the kernel
(`nft -j list table`, handles left out) with what it last wrote and rewrites them when they
differ or are gone. nftables semantics to know: an `accept` ends only its own base chain, so the
forward chain cannot overrule a DROP policy of another table's FORWARD chain (iptables-nft's, as
docker sets it); only a DROP there needs the iptables forward rules (see docs/daemon.md).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network
from typing import Any

from overlay.masq import MULTICAST, IptablesError, Network, remove_chains, run_command

log = logging.getLogger(__name__)

TABLES = {4: ("ip", "flannel-ipv4"), 6: ("ip6", "flannel-ipv6")}
MASQ_CHAIN = "postrtg"
FWD_CHAIN = "forward"
MASQ_COMMENT = "flanneld masq"
FWD_COMMENT = "flanneld forward"
KUBE_PROXY_MARK = "0x4000"
PROBE_TABLE = "overlay-probe"


@dataclass(frozen=True)
class NftFamily:
    """One table's content: the network, our lease in it (None: no masquerade chain)."""

    network: Network
    lease: Network | None
    masq: bool
    forward: bool
    random_fully: bool

    @property
    def family(self) -> str:
        return TABLES[self.network.version][0]

    @property
    def table(self) -> str:
        return TABLES[self.network.version][1]

    def masq_rules(self) -> list[str]:
        if not self.masq or self.lease is None:
            return []
        if self.lease.version != self.network.version:
            raise ValueError(f"network {self.network} and lease {self.lease} differ in family")
        f, net, pod = self.family, str(self.network), str(self.lease)
        masquerade = "masquerade fully-random" if self.random_fully else "masquerade"
        c = f'comment "{MASQ_COMMENT}"'
        return [
            f"meta mark & {KUBE_PROXY_MARK} == {KUBE_PROXY_MARK} return {c}",
            f"{f} saddr {pod} {f} daddr {net} return {c}",
            f"{f} saddr {net} {f} daddr {pod} return {c}",
            f"{f} saddr != {net} {f} daddr {pod} return {c}",
            f"{f} saddr {net} {f} daddr != {MULTICAST[self.network.version]} {masquerade} {c}",
            f"{f} saddr != {net} {f} daddr {net} {masquerade} {c}",
        ]

    def forward_rules(self) -> list[str]:
        if not self.forward:
            return []
        f, net, c = self.family, str(self.network), f'comment "{FWD_COMMENT}"'
        return [f"{f} saddr {net} accept {c}", f"{f} daddr {net} accept {c}"]

    def definition(self) -> str:
        """`table <family> <name> { ... }`, or "" when nothing is enabled for this family."""
        masq, fwd = self.masq_rules(), self.forward_rules()
        if not masq and not fwd:
            return ""
        lines = [f"table {self.family} {self.table} {{", f'\tcomment "rules for {self.table}"']
        if masq:
            lines += [f"\tchain {MASQ_CHAIN} {{",
                      '\t\tcomment "chain to manage traffic masquerading by flannel"',
                      "\t\ttype nat hook postrouting priority srcnat; policy accept;",
                      *(f"\t\t{r}" for r in masq), "\t}"]  # fmt: skip
        if fwd:
            lines += [f"\tchain {FWD_CHAIN} {{",
                      '\t\tcomment "chain to accept flannel traffic"',
                      "\t\ttype filter hook forward priority filter; policy accept;",
                      *(f"\t\t{r}" for r in fwd), "\t}"]  # fmt: skip
        lines.append("}")
        return "\n".join(lines) + "\n"


def replace_script(families: Sequence[NftFamily]) -> str:
    """The `nft -f -` input that replaces every given table in one transaction. A family with
    nothing enabled has its table deleted."""
    out: list[str] = []
    for fam in families:
        out += [f"add table {fam.family} {fam.table}", f"delete table {fam.family} {fam.table}"]
        body = fam.definition()
        if body:
            out.append(body.rstrip("\n"))
    return "\n".join(out) + "\n"


def delete_script(tables: Sequence[tuple[str, str]]) -> str:
    """Delete tables whether or not they exist (add first), in one transaction."""
    return "".join(f"add table {f} {t}\ndelete table {f} {t}\n" for f, t in tables)


def _strip(value: Any) -> Any:
    """A JSON value without the kernel's object handles (they change on every rewrite)."""
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k != "handle"}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def fingerprint(listing: str) -> str | None:
    """A canonical form of `nft -j list table` output (no metainfo, no handles), to compare two
    listings; None when the text is not such a listing (anything odd counts as "changed")."""
    try:
        doc = json.loads(listing)
        items = doc.get("nftables") if isinstance(doc, dict) else None
        if not isinstance(items, list):
            return None
        kept = [_strip(i) for i in items if not (isinstance(i, dict) and "metainfo" in i)]
        return json.dumps(kept, sort_keys=True) if kept else None
    except (ValueError, RecursionError):
        return None


async def probe_fully_random(prefix: Sequence[str] = ()) -> bool | None:
    """Whether nft and the kernel accept `masquerade fully-random`: a scratch table checked
    with `nft --check` (not committed). None: nft cannot run at all (not installed)."""
    text = (f"table ip {PROBE_TABLE} {{\n\tchain probe {{\n\t\ttype nat hook postrouting "
            "priority srcnat; policy accept;\n\t\tmasquerade fully-random\n\t}\n}\n")  # fmt: skip
    try:
        rc, _, _ = await run_command([*prefix, "nft", "-c", "-f", "-"], check=False,
                                     stdin=text.encode())  # fmt: skip
    except IptablesError as e:
        log.debug("fully-random probe: %s", e)
        return None
    return rc == 0


async def existing_tables(prefix: Sequence[str] = ()) -> set[tuple[str, str]]:
    """Our tables (flannel-ipv4/-ipv6) present in the kernel, as (family, name)."""
    _, out, _ = await run_command([*prefix, "nft", "list", "tables"])
    ours = set(TABLES.values())
    found = {tuple(line.split()[1:3]) for line in out.splitlines() if len(line.split()) == 3}
    return {(f, t) for f, t in ours if (f, t) in found}


async def remove_tables(
    prefix: Sequence[str] = (), tables: Sequence[tuple[str, str]] | None = None, *,
    quiet: bool = False,
) -> None:  # fmt: skip
    """Delete our tables (all of them by default). `quiet`: no nft installed is fine."""
    try:
        present = await existing_tables(prefix)
    except IptablesError as e:
        if quiet:
            log.debug("nftables not looked at: %s", e)
            return
        raise
    doomed = sorted(present & set(TABLES.values() if tables is None else tables))
    if doomed:
        await run_command([*prefix, "nft", "-f", "-"], stdin=delete_script(doomed).encode())
        log.info("removed nftables table(s) %s", ", ".join(f"{f} {t}" for f, t in doomed))


class NftRules:
    """flannel's rules in nftables tables of our own; runs `nft` behind `prefix`."""

    name = "nftables"

    def __init__(
        self, network: IPv4Network | None, lease: IPv4Network | None, *,
        ipv6: tuple[IPv6Network, IPv6Network | None] | None = None,
        masq: bool = True, forward: bool = True, random_fully: bool = True,
        prefix: Sequence[str] = (),
    ) -> None:  # fmt: skip
        """`network` None: an IPv6-only network (EnableIPv4 false), no IPv4 table."""
        self.network, self.ipv6 = network, ipv6
        self.masq, self.forward, self.random_fully = masq, forward, random_fully
        self.prefix = tuple(prefix)
        self.families: tuple[NftFamily, ...] = ()
        self._written: dict[str, str | None] = {}
        """table -> fingerprint of what the last ensure() left in the kernel."""
        self._script: str | None = None
        """The script the last ensure() applied (a new lease changes it)."""
        self.set_lease(lease, ipv6[1] if ipv6 else None)

    def set_lease(self, lease: IPv4Network | None, ipv6_lease: IPv6Network | None = None) -> None:
        fams = []
        if self.network is not None:
            fams.append(NftFamily(self.network, lease, self.masq, self.forward, self.random_fully))
        if self.ipv6 is not None:
            fams.append(NftFamily(self.ipv6[0], ipv6_lease, self.masq, self.forward,
                                  self.random_fully))  # fmt: skip
        self.families = tuple(fams)

    def script(self) -> str:
        return replace_script(self.families)

    async def _fingerprint(self, fam: NftFamily) -> str | None:
        argv = [*self.prefix, "nft", "-j", "list", "table", fam.family, fam.table]
        rc, out, _ = await run_command(argv, check=False)
        return fingerprint(out) if rc == 0 else None

    async def ensure(self) -> bool:
        """One `nft -f -` transaction for all tables when any differs from what we wrote."""
        wanted = [f for f in self.families if f.definition()]
        if not wanted:
            return False
        text = replace_script(wanted)
        current = {f.table: await self._fingerprint(f) for f in wanted}
        if text == self._script and all(
            current[t] is not None and current[t] == self._written.get(t) for t in current
        ):
            return False
        try:
            await run_command([*self.prefix, "nft", "-f", "-"], stdin=text.encode())
        except IptablesError as e:
            raise IptablesError(f"{e}; its input was:\n{text}") from None
        self._script = text
        self._written = {f.table: await self._fingerprint(f) for f in wanted}
        return True

    async def remove(self) -> None:
        """Delete both tables (missing ones are fine)."""
        await remove_tables(self.prefix)
        self._written, self._script = {}, None

    async def prune(self) -> None:
        """Tables of families with nothing enabled, and the iptables chains of a previous run
        in iptables mode (iptables and ip6tables; a missing binary is skipped)."""
        unused = [TABLES[f.network.version] for f in self.families if not f.definition()]
        if self.ipv6 is None:
            unused.append(TABLES[6])
        if self.network is None:
            unused.append(TABLES[4])
        await remove_tables(self.prefix, unused)
        await remove_chains(self.prefix, ("iptables", "ip6tables"), why="nftables mode now")
