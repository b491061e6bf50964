"""--ip-masq: flannel's iptables rules, kept in place by a periodic resync.

nat table, chain FLANNEL-POSTRTG, jumped to from POSTROUTING:
    -m mark --mark 0x4000/0x4000 -j RETURN         kube-proxy's masquerade mark: no double NAT
    -s <lease> -d <network> -j RETURN              within the overlay: no NAT
    -s <network> -d <lease> -j RETURN
    ! -s <network> -d <lease> -j RETURN            external traffic arriving for our pods
    -s <network> ! -d 224.0.0.0/4 -j MASQUERADE --random-fully   leaving the overlay
    ! -s <network> -d <network> -j MASQUERADE --random-fully     host -> overlay
filter table, chain FLANNEL-FWD, jumped to from FORWARD:
    -s <network> -j ACCEPT
    -d <network> -j ACCEPT

Idempotent: `ensure()` checks each chain (`iptables -S` and `-C` per rule) and its jump, and
only when something differs writes that table in one `iptables-restore --noflush` transaction:
the chain declared (which creates it, or empties an existing one inside the transaction), its
rules appended in order, the jump inserted at the top when missing, COMMIT. So no other process
ever sees the chain empty or half written, and rules of other chains and tables are untouched.
Every rule carries a comment ("flanneld masq" / "flanneld forward") as flannel's do. Rules are
left in place on exit (like routes); `remove()` takes them out (tests, uninstall).
"""

from __future__ import annotations

import asyncio
import logging
import shlex
from collections.abc import Sequence
from dataclasses import dataclass

from subnetmgr.model import Subnet

log = logging.getLogger(__name__)

NAT_CHAIN = "FLANNEL-POSTRTG"
FWD_CHAIN = "FLANNEL-FWD"
MASQ_COMMENT = "flanneld masq"
FWD_COMMENT = "flanneld forward"
KUBE_PROXY_MARK = "0x4000/0x4000"
IPTABLES_TIMEOUT = 10.0


class IptablesError(RuntimeError):
    pass


@dataclass(frozen=True)
class ChainSpec:
    table: str
    chain: str
    parent: str
    comment: str
    rules: tuple[tuple[str, ...], ...]


def masq_chains(network: Subnet, lease: Subnet) -> tuple[ChainSpec, ChainSpec]:
    net, pod = str(network), str(lease)
    mc = ("-m", "comment", "--comment", MASQ_COMMENT)
    fc = ("-m", "comment", "--comment", FWD_COMMENT)
    random = ("-j", "MASQUERADE", "--random-fully")
    nat = ChainSpec("nat", NAT_CHAIN, "POSTROUTING", MASQ_COMMENT, (
        ("-m", "mark", "--mark", KUBE_PROXY_MARK, *mc, "-j", "RETURN"),
        ("-s", pod, "-d", net, *mc, "-j", "RETURN"),
        ("-s", net, "-d", pod, *mc, "-j", "RETURN"),
        ("!", "-s", net, "-d", pod, *mc, "-j", "RETURN"),
        ("-s", net, "!", "-d", "224.0.0.0/4", *mc, *random),
        ("!", "-s", net, "-d", net, *mc, *random),
    ))  # fmt: skip
    fwd = ChainSpec("filter", FWD_CHAIN, "FORWARD", FWD_COMMENT, (
        ("-s", net, *fc, "-j", "ACCEPT"),
        ("-d", net, *fc, "-j", "ACCEPT"),
    ))  # fmt: skip
    return nat, fwd


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


class Masquerade:
    """Runs `iptables` (optionally behind `prefix`, e.g. `ip netns exec NS`)."""

    def __init__(
        self, network: Subnet, lease: Subnet, *, prefix: Sequence[str] = (),
        iptables: str = "iptables", iptables_restore: str | None = None,
    ) -> None:  # fmt: skip
        self.chains = masq_chains(network, lease)
        self.prefix = tuple(prefix)
        self.iptables = iptables
        self.iptables_restore = iptables_restore or f"{iptables}-restore"

    def set_lease(self, network: Subnet, lease: Subnet) -> None:
        self.chains = masq_chains(network, lease)

    async def _run(self, *args: str, check: bool = True) -> tuple[int, str]:
        return await self._exec([*self.prefix, self.iptables, "-w", "5", *args], check=check)

    async def _restore(self, text: str) -> None:
        """One `iptables-restore --noflush` transaction (one table, ending in COMMIT)."""
        argv = [*self.prefix, self.iptables_restore, "-w", "5", "--noflush"]
        try:
            await self._exec(argv, stdin=text.encode())
        except IptablesError as e:
            raise IptablesError(f"{e}; its input was:\n{text}") from None

    async def _exec(
        self, argv: list[str], *, check: bool = True, stdin: bytes | None = None
    ) -> tuple[int, str]:
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL if stdin is None else asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except FileNotFoundError:
            raise IptablesError(
                f"{argv[0]} not found: install iptables (apt-get install iptables)"
            ) from None
        try:
            async with asyncio.timeout(IPTABLES_TIMEOUT):
                out, err = await proc.communicate(stdin)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise IptablesError(f"`{shlex.join(argv)}` timed out") from None
        rc = proc.returncode or 0
        if check and rc != 0:
            raise IptablesError(f"`{shlex.join(argv)}` failed ({rc}): {err.decode().strip()}")
        return rc, out.decode()

    async def _current(self, spec: ChainSpec) -> list[str] | None:
        rc, out = await self._run("-t", spec.table, "-S", spec.chain, check=False)
        if rc != 0:
            return None
        prefix = f"-A {spec.chain} "
        return [line[len(prefix) :] for line in out.splitlines() if line.startswith(prefix)]

    async def _chain_ok(self, spec: ChainSpec, current: list[str]) -> bool:
        if len(current) != len(spec.rules):
            return False
        for rule in spec.rules:
            rc, _ = await self._run("-t", spec.table, "-C", spec.chain, *rule, check=False)
            if rc != 0:
                return False
        return True

    async def ensure(self) -> bool:
        """Make the rules match; returns True when something had to be (re)written.

        At most one iptables-restore call per table, and none when everything is in place."""
        changed = False
        for spec in self.chains:
            current = await self._current(spec)
            rewrite = current is None or not await self._chain_ok(spec, current)
            rc, _ = await self._run("-t", spec.table, "-C", spec.parent, *_jump(spec), check=False)
            jump_missing = rc != 0
            if rewrite or jump_missing:
                await self._restore(restore_input(spec, rules=rewrite, jump=jump_missing))
                changed = True
        return changed

    async def remove(self) -> None:
        """Take the jumps and chains out (missing pieces are fine)."""
        for spec in self.chains:
            jump = _jump(spec)
            while (await self._run("-t", spec.table, "-D", spec.parent, *jump, check=False))[
                0
            ] == 0:
                pass
            await self._run("-t", spec.table, "-F", spec.chain, check=False)
            await self._run("-t", spec.table, "-X", spec.chain, check=False)
