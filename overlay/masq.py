"""Traffic rules as flanneld has them: masquerade (`--ip-masq`) and forward accept rules
(`--iptables-forward-rules`), with iptables (the default) or nftables (`EnableNFTables` in the
network config, overlay/nftrules.py). Both sit behind `TrafficRules`; `traffic_rules()` picks one.

iptables, per family (iptables for IPv4; ip6tables for an IPv6Network, multicast ff00::/8):

nat table, chain FLANNEL-POSTRTG, jumped to from POSTROUTING (only with --ip-masq):
    -m mark --mark 0x4000/0x4000 -j RETURN         kube-proxy's masquerade mark: no double NAT
    -s <lease> -d <network> -j RETURN              within the overlay: no NAT
    -s <network> -d <lease> -j RETURN
    ! -s <network> -d <lease> -j RETURN            external traffic arriving for our pods
    -s <network> ! -d 224.0.0.0/4 -j MASQUERADE --random-fully   leaving the overlay
    ! -s <network> -d <network> -j MASQUERADE --random-fully     host -> overlay
filter table, chain FLANNEL-FWD, jumped to from FORWARD (--iptables-forward-rules, default on,
independent of --ip-masq), so a host whose FORWARD policy is DROP (docker sets it) still
forwards overlay traffic:
    -s <network> -j ACCEPT
    -d <network> -j ACCEPT

`--random-fully` is left out with --ip-masq-fully-random-disable, and when the iptables in use
does not know it (`probe_random_fully`, checked once at start; a WARNING says so).

Idempotent: `ensure()` checks each chain (`iptables -S` and `-C` per rule) and its jump, and
only when something differs writes that table in one `iptables-restore --noflush` transaction:
the chain declared (which creates it, or empties an existing one inside the transaction), its
rules appended in order, the jump inserted at the top when missing, COMMIT. So no other process
ever sees the chain empty or half written, and rules of other chains and tables are untouched.
Every rule carries a comment ("flanneld masq" / "flanneld forward") as flannel's do. Rules are
left in place on exit (like routes); `remove()` takes them out (tests, uninstall); `prune()`
(once at start) takes out what this configuration does not install: the nat chain without
--ip-masq, the forward chain with --iptables-forward-rules=false, and the other mode's rules
(the nftables tables in iptables mode), so two setups never fight over the same traffic.
"""

from __future__ import annotations

import asyncio
import logging
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network
from typing import Protocol

from subnetmgr.model import Lease, NetworkConfig

log = logging.getLogger(__name__)

NAT_CHAIN = "FLANNEL-POSTRTG"
FWD_CHAIN = "FLANNEL-FWD"
MASQ_COMMENT = "flanneld masq"
FWD_COMMENT = "flanneld forward"
KUBE_PROXY_MARK = "0x4000/0x4000"
MULTICAST = {4: "224.0.0.0/4", 6: "ff00::/8"}
IPTABLES_TIMEOUT = 10.0
PROBE_CHAIN = "OVERLAY-PROBE"

Network = IPv4Network | IPv6Network


class IptablesError(RuntimeError):
    """An iptables/ip6tables/nft command failed, timed out or is not installed."""


class TrafficRules(Protocol):
    """The masquerade and forward rules of one host, kept by the --iptables-resync loop."""

    name: str
    """"iptables" or "nftables" (for logs)."""

    def set_lease(self, lease: IPv4Network | None, ipv6_lease: IPv6Network | None = None) -> None:
        """A new own lease: the next ensure() writes rules for it."""

    async def ensure(self) -> bool:
        """Make the rules match; True when something had to be (re)written."""

    async def remove(self) -> None:
        """Take out every rule of this kind that overlay installs (missing pieces are fine)."""

    async def prune(self) -> None:
        """Take out what this configuration does not install (disabled parts, the other mode)."""


@dataclass(frozen=True)
class ChainSpec:
    table: str
    chain: str
    parent: str
    comment: str
    rules: tuple[tuple[str, ...], ...]


def masq_chain(network: Network, lease: Network, *, random_fully: bool = True) -> ChainSpec:
    """flannel's nat chain for one family (IPv6: multicast is ff00::/8)."""
    if network.version != lease.version:
        raise ValueError(f"network {network} and lease {lease} are of different families")
    net, pod, mcast = str(network), str(lease), MULTICAST[network.version]
    mc = ("-m", "comment", "--comment", MASQ_COMMENT)
    masq = ("-j", "MASQUERADE", "--random-fully") if random_fully else ("-j", "MASQUERADE")
    return ChainSpec("nat", NAT_CHAIN, "POSTROUTING", MASQ_COMMENT, (
        ("-m", "mark", "--mark", KUBE_PROXY_MARK, *mc, "-j", "RETURN"),
        ("-s", pod, "-d", net, *mc, "-j", "RETURN"),
        ("-s", net, "-d", pod, *mc, "-j", "RETURN"),
        ("!", "-s", net, "-d", pod, *mc, "-j", "RETURN"),
        ("-s", net, "!", "-d", mcast, *mc, *masq),
        ("!", "-s", net, "-d", net, *mc, *masq),
    ))  # fmt: skip


def forward_chain(network: Network) -> ChainSpec:
    """flannel's FLANNEL-FWD: accept the network as source and as destination."""
    fc = ("-m", "comment", "--comment", FWD_COMMENT)
    return ChainSpec("filter", FWD_CHAIN, "FORWARD", FWD_COMMENT, (
        ("-s", str(network), *fc, "-j", "ACCEPT"),
        ("-d", str(network), *fc, "-j", "ACCEPT"),
    ))  # fmt: skip


def masq_chains(
    network: Network, lease: Network, *, random_fully: bool = True
) -> tuple[ChainSpec, ChainSpec]:
    """Both chains (nat, filter) for one family."""
    return masq_chain(network, lease, random_fully=random_fully), forward_chain(network)


def _jump(spec: ChainSpec) -> tuple[str, ...]:
    return ("-m", "comment", "--comment", spec.comment, "-j", spec.chain)


def _restore_word(arg: str) -> str:
    """One argument as iptables-restore reads it: double-quoted when it has a space."""
    if not arg or any(c in arg for c in "\"'\\\n\r\x00"):
        raise ValueError(f"not an iptables-restore argument: {arg!r}")
    return f'"{arg}"' if any(c.isspace() for c in arg) else arg


def restore_input(spec: ChainSpec, *, rules: bool, jump: bool) -> str:
    """The iptables-restore --noflush input for one table: the chain declared and refilled
    (`rules`), and/or the jump to it inserted at the top of its parent (`jump`)."""
    lines = [f"*{spec.table}"]
    if rules:
        lines.append(f":{spec.chain} - [0:0]")
        lines += [" ".join(map(_restore_word, ("-A", spec.chain, *r))) for r in spec.rules]
    if jump:
        lines.append(" ".join(map(_restore_word, ("-I", spec.parent, "1", *_jump(spec)))))
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


async def run_command(
    argv: Sequence[str], *, check: bool = True, stdin: bytes | None = None
) -> tuple[int, str, str]:
    """Run one command (bounded by IPTABLES_TIMEOUT): (exit code, stdout, stderr).

    A missing program, a timeout and (with `check`) a non-zero exit raise IptablesError."""
    argv = list(argv)
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL if stdin is None else asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except FileNotFoundError:
        raise IptablesError(f"{argv[0]} not found: install it (apt-get install iptables "
                            "nftables)") from None  # fmt: skip
    try:
        async with asyncio.timeout(IPTABLES_TIMEOUT):
            out, err = await proc.communicate(stdin)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise IptablesError(f"`{shlex.join(argv)}` timed out") from None
    rc = proc.returncode or 0
    text, errors = out.decode(errors="replace"), err.decode(errors="replace").strip()
    if check and rc != 0:
        raise IptablesError(f"`{shlex.join(argv)}` failed ({rc}): {errors}")
    return rc, text, errors


async def probe_random_fully(prefix: Sequence[str] = (), iptables: str = "iptables") -> bool | None:
    """Whether this iptables accepts `-j MASQUERADE --random-fully`: a rule with it in a scratch
    chain, parsed by `iptables-restore --test` (nothing is committed). None: it cannot run at
    all (not installed), which the first ensure() reports."""
    text = (f"*nat\n:{PROBE_CHAIN} - [0:0]\n-A {PROBE_CHAIN} -j MASQUERADE --random-fully\n"
            "COMMIT\n")  # fmt: skip
    argv = [*prefix, f"{iptables}-restore", "-w", "5", "--test", "--noflush"]
    try:
        rc, _, _ = await run_command(argv, check=False, stdin=text.encode())
    except IptablesError as e:
        log.debug("random-fully probe: %s", e)
        return None
    return rc == 0


async def _remove_chain(prefix: Sequence[str], binary: str, spec: ChainSpec) -> bool:
    """Take one chain and its jumps out (missing pieces are fine); True when it was there."""
    ipt = [*prefix, binary, "-w", "5", "-t", spec.table]
    found = False
    while (await run_command([*ipt, "-D", spec.parent, *_jump(spec)], check=False))[0] == 0:
        found = True
    if (await run_command([*ipt, "-F", spec.chain], check=False))[0] == 0:
        found = True
    await run_command([*ipt, "-X", spec.chain], check=False)
    return found


async def remove_chains(
    prefix: Sequence[str], binaries: Sequence[str], *, only: Sequence[ChainSpec] | None = None,
    why: str = "",
) -> None:  # fmt: skip
    """Take our chains (FLANNEL-POSTRTG, FLANNEL-FWD; or `only` these) out with each binary.
    With `why` (pruning): a binary that is not installed is skipped, a removal logged."""
    placeholder = IPv4Network("0.0.0.0/0")  # the rules do not matter for removal
    specs = only if only is not None else masq_chains(placeholder, placeholder)
    for binary in binaries:
        for spec in specs:
            try:
                if await _remove_chain(prefix, binary, spec) and why:
                    log.info("removed %s chain %s (%s)", binary, spec.chain, why)
            except IptablesError as e:
                if not why:
                    raise
                log.debug("%s not looked at: %s", binary, e)
                break


@dataclass
class _Family:
    """The chains of one address family and the programs that write them."""

    iptables: str
    chains: tuple[ChainSpec, ...]
    unwanted: tuple[ChainSpec, ...]


class IptablesRules:
    """flannel's iptables rules; runs `iptables` (optionally behind `prefix`, e.g.
    `ip netns exec NS`). An IPv6 family (ip6tables) only with `ipv6=(network, lease)`."""

    name = "iptables"

    def __init__(
        self, network: IPv4Network | None, lease: IPv4Network | None, *,
        ipv6: tuple[IPv6Network, IPv6Network | None] | None = None,
        masq: bool = True, forward: bool = True, random_fully: bool = True,
        prefix: Sequence[str] = (), iptables: str = "iptables", ip6tables: str = "ip6tables",
    ) -> None:  # fmt: skip
        """`network` None: an IPv6-only network (EnableIPv4 false), no IPv4 chains."""
        self.network, self.ipv6 = network, ipv6
        self.masq, self.forward, self.random_fully = masq, forward, random_fully
        self.prefix = tuple(prefix)
        self.iptables, self.ip6tables = iptables, ip6tables
        self.families: list[_Family] = []
        self.set_lease(lease, ipv6[1] if ipv6 else None)

    def set_lease(self, lease: IPv4Network | None, ipv6_lease: IPv6Network | None = None) -> None:
        plan: list[tuple[str, Network, Network | None]] = []
        if self.network is not None:
            plan.append((self.iptables, self.network, lease))
        if self.ipv6 is not None:
            plan.append((self.ip6tables, self.ipv6[0], ipv6_lease))
        self.families = []
        for binary, network, own in plan:
            wanted: list[ChainSpec] = []
            unwanted: list[ChainSpec] = []
            placeholder = own if own is not None else network
            nat = masq_chain(network, placeholder, random_fully=self.random_fully)
            (wanted if self.masq and own is not None else unwanted).append(nat)
            (wanted if self.forward else unwanted).append(forward_chain(network))
            self.families.append(_Family(binary, tuple(wanted), tuple(unwanted)))

    @property
    def chains(self) -> tuple[ChainSpec, ...]:
        """The first family's chains installed (nat first, then filter): IPv4's, or IPv6's in
        an IPv6-only network."""
        return self.families[0].chains

    async def _run(self, binary: str, *args: str, check: bool = True) -> tuple[int, str]:
        rc, out, _ = await run_command([*self.prefix, binary, "-w", "5", *args], check=check)
        return rc, out

    async def _restore(self, binary: str, text: str) -> None:
        """One `iptables-restore --noflush` transaction (one table, ending in COMMIT)."""
        argv = [*self.prefix, f"{binary}-restore", "-w", "5", "--noflush"]
        try:
            await run_command(argv, stdin=text.encode())
        except IptablesError as e:
            raise IptablesError(f"{e}; its input was:\n{text}") from None

    async def _current(self, binary: str, spec: ChainSpec) -> list[str] | None:
        rc, out = await self._run(binary, "-t", spec.table, "-S", spec.chain, check=False)
        if rc != 0:
            return None
        prefix = f"-A {spec.chain} "
        return [line[len(prefix) :] for line in out.splitlines() if line.startswith(prefix)]

    async def _chain_ok(self, binary: str, spec: ChainSpec, current: list[str]) -> bool:
        if len(current) != len(spec.rules):
            return False
        for rule in spec.rules:
            rc, _ = await self._run(binary, "-t", spec.table, "-C", spec.chain, *rule,
                                    check=False)  # fmt: skip
            if rc != 0:
                return False
        return True

    async def ensure(self) -> bool:
        """At most one iptables-restore call per table, and none when everything is in place."""
        changed = False
        for fam in self.families:
            for spec in fam.chains:
                current = await self._current(fam.iptables, spec)
                rewrite = current is None or not await self._chain_ok(fam.iptables, spec, current)
                rc, _ = await self._run(fam.iptables, "-t", spec.table, "-C", spec.parent,
                                        *_jump(spec), check=False)  # fmt: skip
                jump_missing = rc != 0
                if rewrite or jump_missing:
                    text = restore_input(spec, rules=rewrite, jump=jump_missing)
                    await self._restore(fam.iptables, text)
                    changed = True
        return changed

    async def remove(self) -> None:
        """Take the jumps and chains out (missing pieces are fine)."""
        await remove_chains(self.prefix, [fam.iptables for fam in self.families])

    async def prune(self) -> None:
        """Chains of disabled parts (also IPv6 ones without an IPv6Network now), and the
        nftables tables of a previous EnableNFTables run."""
        for fam in self.families:
            await remove_chains(self.prefix, [fam.iptables], only=fam.unwanted,
                                why="not enabled now")  # fmt: skip
        if self.ipv6 is None:
            await remove_chains(self.prefix, [self.ip6tables], why="no IPv6Network now")
        if self.network is None:
            await remove_chains(self.prefix, [self.iptables], why="IPv6-only network now")
        from overlay.nftrules import remove_tables

        await remove_tables(self.prefix, quiet=True)


async def traffic_rules(
    config: NetworkConfig, lease: Lease, *, masq: bool, forward: bool,
    random_fully_disable: bool = False, prefix: Sequence[str] = (),
) -> TrafficRules:  # fmt: skip
    """The rules for this config: nftables when EnableNFTables is true, else iptables (flannel's
    default). Probes --random-fully support once (only when it matters) and warns without it."""
    from overlay.nftrules import NftRules, probe_fully_random

    nft = config.enable_nftables
    random_fully = masq and not random_fully_disable
    if random_fully:
        probed = await (probe_fully_random(prefix) if nft else probe_random_fully(prefix))
        random_fully = probed is not False  # None: not runnable, ensure() will say so
        if not random_fully:
            tool = "nft" if nft else "iptables"
            log.warning("%s here does not support fully random masquerading: using plain "
                        "masquerade (source ports less random)", tool)  # fmt: skip
    ipv6 = (config.ipv6_network, lease.ipv6_subnet) if config.ipv6_network is not None else None
    own4 = None if config.network is None else lease.subnet
    if nft:
        return NftRules(config.network, own4, ipv6=ipv6, masq=masq, forward=forward,
                        random_fully=random_fully, prefix=prefix)  # fmt: skip
    return IptablesRules(config.network, own4, ipv6=ipv6, masq=masq, forward=forward,
                         random_fully=random_fully, prefix=prefix)  # fmt: skip
