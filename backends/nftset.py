"""An nftables allow-list for one port: datagrams to it are admitted only from a set of IPv4
(family `ip`) or IPv6 (family `ip6`) sources; the rest are dropped and counted. The vxlan
backend's `FilterPeers` uses it for UDP 8472, one table per underlay family; nothing here is
vxlan-specific.

The table is ours alone; everything in it is rewritten to this shape when it differs (family
`ip6`: `table ip6`, `type ipv6_addr`, `ip6 saddr`)::

    table ip <table> {
        counter dropped { packets N bytes M }
        set peers { type ipv4_addr; elements = { ... } }
        chain input {
            type filter hook input priority filter; policy accept;
            udp dport <port> ip saddr != @peers counter name "dropped" drop comment "<comment>"
        }
    }

Every change is ONE `nft -f -` run, and nft sends a whole file to the kernel as one transaction
(one batch, one commit: `nft monitor` prints one "new generation" line for it), so the packet path
sees either the old or the new set, never a set in between:

- `sync(peers)` (a full pass) reads the table (`nft -j list table`), checks its shape, and then
  either adds and deletes the elements that differ, or, when the table is missing or anything in
  it differs from the shape above, declares the whole table with all elements in one
  transaction (replacing an existing one: `add table; delete table; table {...}`), carrying the
  drop counter's values over;
- `update(admit, remove)` (an incremental pass) sends only the named elements: `add element` for
  the admitted ones, `add element` then `delete element` for removed ones, so that a delete of an
  element that is already gone cannot fail the transaction. It fails (NftError) when the set
  itself is gone; the caller then runs `sync`.

Writes go through the `nft` command (package nftables), one exec per change: creating the table
with 10,000 elements took 45-135 ms here, adding one element ~4 ms, removing one ~15-18 ms (nft
1.0.6 loads the set's elements before a delete); bench/bench_vxlan_filter.py. The drop counter
is read at metrics scrape time with one netfilter netlink request (NFT_MSG_GETOBJ): ~9 us, at
most COUNTER_TIMEOUT, where `nft -j list counter` takes tens of ms because nft loads the whole
table (10,000 elements) first.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import re
import shutil
import socket
import struct
import time
from collections.abc import Iterable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from ipaddress import AddressValueError, IPv4Address, IPv6Address
from typing import Any

from backends import netlink as nl

FAMILY = "ip"
"""The default nftables family (IPv4 underlay); a PortFilter of family `ip6` serves IPv6."""
FAMILIES = {"ip": ("ipv4_addr", 2), "ip6": ("ipv6_addr", 10)}
"""nftables family -> (its set's address type, its NFPROTO_* number)."""
Address = IPv4Address | IPv6Address
SET = "peers"
COUNTER = "dropped"
CHAIN = "input"
COMMAND_TIMEOUT = 10.0
"""Seconds allowed for one nft command."""
COUNTER_TIMEOUT = 0.5
"""Seconds a counter read may wait for the kernel's answer (it answers at once)."""
ELEMENTS_PER_STATEMENT = 1024
"""Elements per `add element` statement (all statements still go in one transaction)."""
NFT_FALLBACKS = ("/usr/sbin/nft", "/sbin/nft")
"""Where nft is looked for when it is not on PATH (a daemon started with a minimal PATH)."""
MAX_ERROR_TEXT = 2000
"""Characters of nft's stderr kept in an error message."""

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,31}$")
_COMMENT = re.compile(r"^[A-Za-z0-9 .,:/()_+-]{1,100}$")
PROTOCOLS = ("udp", "tcp")


class NftError(RuntimeError):
    """An nft command failed, or its output or the kernel's answer could not be understood."""


# --------------------------------------------------------------------------- the table's shape


@dataclass(frozen=True)
class PortFilter:
    """Which table, which port: the parameters of one allow-list."""

    table: str
    port: int
    comment: str
    protocol: str = "udp"
    family: str = FAMILY
    """`ip` (IPv4 sources) or `ip6` (IPv6 sources)."""

    def __post_init__(self) -> None:
        if not _NAME.match(self.table):
            raise ValueError(f"nft table name {self.table!r}: letters, digits, _; at most 32")
        if isinstance(self.port, bool) or not isinstance(self.port, int):
            raise ValueError(f"port {self.port!r} is not an integer")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port {self.port} is not between 1 and 65535")
        if not _COMMENT.match(self.comment):
            raise ValueError(f"nft comment {self.comment!r}: 1-100 plain characters, no quotes")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol {self.protocol!r} is not one of {PROTOCOLS}")
        if self.family not in FAMILIES:
            raise ValueError(f"nft family {self.family!r} is not one of {sorted(FAMILIES)}")

    @property
    def set_type(self) -> str:
        return FAMILIES[self.family][0]

    def address(self, text: str) -> Address:
        """An address of this family from its text; AddressValueError otherwise."""
        return IPv4Address(text) if self.family == "ip" else IPv6Address(text)

    @property
    def rule(self) -> str:
        return (
            f"{self.protocol} dport {self.port} {self.family} saddr != @{SET} "
            f'counter name "{COUNTER}" drop comment "{self.comment}"'
        )

    def rule_expr(self) -> list[dict[str, Any]]:
        """The rule as `nft -j` prints it (nftables 1.0.x JSON schema 1)."""
        return [
            {
                "match": {
                    "op": "==",
                    "left": {"payload": {"protocol": self.protocol, "field": "dport"}},
                    "right": self.port,
                }
            },
            {
                "match": {
                    "op": "!=",
                    "left": {"payload": {"protocol": self.family, "field": "saddr"}},
                    "right": f"@{SET}",
                }
            },
            {"counter": COUNTER},
            {"drop": None},
        ]


@dataclass(frozen=True)
class Counter:
    packets: int = 0
    bytes: int = 0


@dataclass(frozen=True)
class TableState:
    """What `nft -j list table` showed: the set's elements, the drop counter, and every way in
    which the table differs from our shape (empty: only the elements may differ)."""

    elements: frozenset[Address] = frozenset()
    counter: Counter | None = None
    problems: tuple[str, ...] = ()


# --------------------------------------------------------------------------- scripts (pure)


def _check(spec: PortFilter, addrs: Iterable[Address]) -> list[Address]:
    """The addresses sorted; ValueError for one of the other family (it would break the file)."""
    version = 4 if spec.family == "ip" else 6
    unique = set(addrs)
    wrong = sorted(str(a) for a in unique if a.version != version)
    if wrong:
        raise ValueError(f"not IPv{version} addresses for an {spec.family} table: {wrong[:5]}")
    return sorted(unique, key=int)


def _element_lines(verb: str, spec: PortFilter, addrs: Iterable[Address]) -> list[str]:
    ordered = _check(spec, addrs)
    return [
        f"{verb} element {spec.family} {spec.table} {SET} {{ "
        + ", ".join(str(a) for a in ordered[i : i + ELEMENTS_PER_STATEMENT])
        + " }"
        for i in range(0, len(ordered), ELEMENTS_PER_STATEMENT)
    ]


def table_script(
    spec: PortFilter,
    peers: AbstractSet[Address],
    *,
    counter: Counter | None = None,
    replace: bool = False,
) -> str:
    """The whole table with these elements, as one nft file (one transaction).

    `replace`: an existing table of that name is deleted first, in the same transaction (the
    `add table` before the delete makes it work whether or not the table exists). `counter`
    gives the drop counter's starting values (carried over from the table replaced)."""
    c = counter or Counter()
    t, f = spec.table, spec.family
    lines = [f"add table {f} {t}", f"delete table {f} {t}"] if replace else []
    lines += [
        f"table {f} {t} {{",
        f"\tcounter {COUNTER} {{ packets {c.packets} bytes {c.bytes} }}",
        f"\tset {SET} {{ type {spec.set_type}; }}",
        f"\tchain {CHAIN} {{",
        "\t\ttype filter hook input priority filter; policy accept;",
        f"\t\t{spec.rule}",
        "\t}",
        "}",
    ]
    lines += _element_lines("add", spec, peers)
    return "\n".join(lines) + "\n"


def element_script(
    spec: PortFilter, admit: AbstractSet[Address], remove: AbstractSet[Address]
) -> str:
    """Add `admit`, delete `remove`, in one transaction; "" when both are empty.

    Each removed element is added before it is deleted: a delete of a missing element would
    fail the whole transaction, an add of a present one changes nothing."""
    both = admit & remove
    if both:
        raise ValueError(f"elements both admitted and removed: {sorted(both)}")
    lines = _element_lines("add", spec, admit | remove) + _element_lines("delete", spec, remove)
    return "\n".join(lines) + "\n" if lines else ""


def delete_script(spec: PortFilter) -> str:
    """Delete the table whether or not it exists (one transaction)."""
    return f"add table {spec.family} {spec.table}\ndelete table {spec.family} {spec.table}\n"


# --------------------------------------------------------------------------- parsing nft -j


def _load_items(text: str) -> list[dict[str, Any]]:
    """The objects of an `nft -j` listing, each a one-key dict; NftError if it is not one."""
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise NftError(f"nft -j printed something that is not JSON: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("nftables"), list):
        raise NftError('nft -j output has no "nftables" list')
    items: list[dict[str, Any]] = []
    for item in doc["nftables"]:
        if not isinstance(item, dict) or len(item) != 1:
            raise NftError(f"nft -j output holds an object that is not one keyed entry: {item!r}")
        (kind, body), *_ = item.items()
        if kind != "metainfo":
            if not isinstance(body, dict):
                raise NftError(f"nft -j output: {kind} is not an object: {body!r}")
            items.append(item)
    return items


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _elements(spec: PortFilter, raw: object, problems: list[str]) -> frozenset[Address]:
    if raw is None:
        return frozenset()
    if not isinstance(raw, list):
        problems.append(f"set {SET}: elements are not a list")
        return frozenset()
    out: set[Address] = set()
    for elem in raw:
        try:
            if not isinstance(elem, str):
                raise AddressValueError(repr(elem))
            out.add(spec.address(elem))
        except AddressValueError:
            problems.append(
                f"set {SET}: element {elem!r} is not a plain {spec.set_type} address"[:200]
            )
    return frozenset(out)


def parse_table(spec: PortFilter, text: str) -> TableState:
    """Read `nft -j list table <family> <table>`; NftError when the text is not such a listing.

    Anything in the table beyond our shape (another chain, set, rule or object, a different
    hook, priority, policy, set type or flags, a changed rule) is named in `problems`."""
    items = _load_items(text)
    problems: list[str] = []
    elements: frozenset[Address] = frozenset()
    counter: Counter | None = None
    seen = {"table": False, "set": False, "chain": False, "rules": 0}
    for item in items:
        (kind, body), *_ = item.items()
        owner = body.get("name") if kind == "table" else body.get("table")
        if body.get("family") != spec.family or owner != spec.table:
            problems.append(f"{kind} of another table listed: {body!r}"[:200])
            continue
        name = body.get("name")
        if kind == "table":
            seen["table"] = True
        elif kind == "counter" and name == COUNTER:
            packets, nbytes = _count(body.get("packets")), _count(body.get("bytes"))
            if packets is None or nbytes is None:
                problems.append(f"counter {COUNTER} has no valid packets/bytes: {body!r}"[:200])
            else:
                counter = Counter(packets, nbytes)
        elif kind == "set" and name == SET:
            seen["set"] = True
            extra = sorted(set(body) - {"family", "name", "table", "type", "handle", "elem"})
            if body.get("type") != spec.set_type or extra:
                problems.append(f"set {SET} is not a plain {spec.set_type} set: {body!r}"[:200])
            elements = _elements(spec, body.get("elem"), problems)
        elif kind == "chain" and name == CHAIN:
            seen["chain"] = True
            want = {"type": "filter", "hook": "input", "prio": 0, "policy": "accept"}
            have = {k: body.get(k) for k in want}
            if have != want:
                problems.append(f"chain {CHAIN} is {have}, not {want}")
        elif kind == "rule" and body.get("chain") == CHAIN:
            seen["rules"] += 1
            if body.get("expr") != spec.rule_expr() or body.get("comment") != spec.comment:
                problems.append(f"rule in {CHAIN} differs: {body.get('expr')!r}"[:200])
        else:
            problems.append(f"unexpected {kind} {name!r} in table {spec.table}")
    if not seen["table"]:
        problems.append(f"table {spec.family} {spec.table} not in the listing")
    if counter is None and not any(p.startswith(f"counter {COUNTER}") for p in problems):
        problems.append(f"counter {COUNTER} is missing")
    if not seen["set"]:
        problems.append(f"set {SET} is missing")
    if not seen["chain"]:
        problems.append(f"chain {CHAIN} is missing")
    if seen["rules"] != 1:
        problems.append(f"chain {CHAIN} has {seen['rules']} rules, not 1")
    return TableState(elements, counter, tuple(problems))


def parse_tables(text: str) -> set[tuple[str, str]]:
    """(family, name) of every table in `nft -j list tables`; NftError when malformed."""
    out: set[tuple[str, str]] = set()
    for item in _load_items(text):
        (kind, body), *_ = item.items()
        family, name = body.get("family"), body.get("name")
        if kind != "table" or not isinstance(family, str) or not isinstance(name, str):
            raise NftError(f"nft -j list tables: unexpected entry {item!r}"[:300])
        out.add((family, name))
    return out


# --------------------------------------------------------------------------- counter via netlink

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWOBJ = 18
NFT_MSG_GETOBJ = 19
NFTA_OBJ_TABLE = 1
NFTA_OBJ_NAME = 2
NFTA_OBJ_TYPE = 3
NFTA_OBJ_DATA = 4
NFT_OBJECT_COUNTER = 1
NFTA_COUNTER_BYTES = 1
NFTA_COUNTER_PACKETS = 2
NFPROTO_IPV4 = 2
_NFGENMSG = struct.Struct("=BBH")
_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")


def counter_request(table: str, name: str, seq: int, family: str = FAMILY) -> bytes:
    """NFT_MSG_GETOBJ for the named counter of a table of `family` (acknowledged)."""
    body = (
        _NFGENMSG.pack(FAMILIES[family][1], 0, 0)
        + nl._attr(NFTA_OBJ_TABLE, table.encode() + b"\0")
        + nl._attr(NFTA_OBJ_NAME, name.encode() + b"\0")
        + nl._attr(NFTA_OBJ_TYPE, _BE32.pack(NFT_OBJECT_COUNTER))
    )
    kind = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETOBJ
    return nl._NLMSGHDR.pack(16 + len(body), kind, nl.NLM_F_REQUEST | nl.NLM_F_ACK, seq, 0) + body


@dataclass
class CounterReply:
    """What one datagram said about our request: the counter, the kernel's verdict, or both."""

    counter: Counter | None = None
    error: int | None = None
    """None: no verdict yet; 0: acknowledged; else the kernel's errno."""


def parse_counter_reply(data: bytes, seq: int) -> CounterReply:
    """Decode one netlink datagram answering `counter_request(..., seq)`.

    Messages for other sequence numbers are ignored; NftError when our answer is malformed."""
    out = CounterReply()
    view = memoryview(data)
    for kind, _flags, mseq, payload in nl._messages(view):
        if mseq != seq:
            continue
        if kind == nl.NLMSG_ERROR:
            if len(payload) < 4:
                raise NftError("netlink: truncated error message")
            out.error = -nl._ERR.unpack_from(payload, 0)[0]
        elif kind == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWOBJ:
            if len(payload) < _NFGENMSG.size:
                raise NftError("netlink: truncated nftables object")
            attrs = nl._attrs(payload, _NFGENMSG.size)
            data_attr = attrs.get(NFTA_OBJ_DATA)
            if data_attr is None:
                raise NftError("netlink: nftables object without data")
            inner = nl._attrs(data_attr, 0)
            raw_p, raw_b = inner.get(NFTA_COUNTER_PACKETS), inner.get(NFTA_COUNTER_BYTES)
            if raw_p is None or raw_b is None or len(raw_p) != 8 or len(raw_b) != 8:
                raise NftError("netlink: counter object without 64-bit packets and bytes")
            out.counter = Counter(_BE64.unpack(raw_p)[0], _BE64.unpack(raw_b)[0])
        else:
            raise NftError(f"netlink: unexpected message type {kind} in the answer")
    return out


class CounterReader:
    """A blocking netfilter netlink socket for reading named counters, in a namespace or not.

    `read()` is synchronous (the metrics renderer is) and takes at most COUNTER_TIMEOUT."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self._sock: socket.socket | None = None
        self._seq = 0

    def _socket(self) -> socket.socket:
        if self._sock is None:
            if self.netns is None:
                sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
            else:
                from pyroute2 import netns as pr_netns

                if not os.path.exists(f"/run/netns/{self.netns}"):
                    raise NftError(f"network namespace {self.netns!r} does not exist")
                sock = pr_netns.create_socket(
                    self.netns, socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER, flags=0
                )
            sock.bind((0, 0))
            sock.settimeout(COUNTER_TIMEOUT)
            self._sock = sock
        return self._sock

    def read(self, table: str, name: str, family: str = FAMILY) -> Counter | None:
        """The counter's values; None when the table or counter does not exist."""
        self._seq = (self._seq + 1) & 0xFFFFFFFF or 1
        seq = self._seq
        try:
            sock = self._socket()
            sock.send(counter_request(table, name, seq, family))
            counter: Counter | None = None
            deadline = time.monotonic() + COUNTER_TIMEOUT
            for _ in range(16):  # our answer and its acknowledgement; stale answers skipped
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no answer within {COUNTER_TIMEOUT} s")
                sock.settimeout(left)
                reply = parse_counter_reply(sock.recv(65536), seq)
                counter = reply.counter or counter
                if reply.error is not None:
                    break
            else:
                raise NftError("netlink: no acknowledgement for the counter request")
        except OSError as e:  # includes the socket timeout
            self.close()
            raise NftError(f"reading nft counter {family} {table}/{name}: {e}") from e
        if reply.error == 0 and counter is not None:
            return counter
        if reply.error in (0, errno.ENOENT):
            return None
        raise NftError(
            f"reading nft counter {family} {table}/{name}: {os.strerror(reply.error or 0)}"
        )

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


# --------------------------------------------------------------------------- the nft command


@dataclass
class SyncResult:
    """What a pass did to the table."""

    created: bool = False
    rebuilt: tuple[str, ...] = ()
    """The problems that made a full pass replace the table (empty: it did not)."""
    added: int = 0
    removed: int = 0
    transactions: int = 0


def nft_command() -> str | None:
    """The nft executable: on PATH, else in NFT_FALLBACKS; None when not installed."""
    return shutil.which("nft") or next((p for p in NFT_FALLBACKS if os.access(p, os.X_OK)), None)


@dataclass
class NftTable:
    """One PortFilter's table in the kernel (of `netns`, or of this process)."""

    spec: PortFilter
    netns: str | None = None
    counters: CounterReader = field(init=False)

    def __post_init__(self) -> None:
        self.counters = CounterReader(self.netns)

    async def _nft(self, args: Sequence[str], script: str | None = None) -> tuple[int, str, str]:
        nft = nft_command()
        if nft is None:
            raise NftError("the nft command is not installed (apt-get install nftables)")
        cmd = [nft, *args]
        if self.netns is not None:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        try:
            proc = await asyncio.create_subprocess_exec(
                *cmd,
                stdin=asyncio.subprocess.PIPE if script is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env={**os.environ, "LC_ALL": "C"},
            )
        except OSError as e:
            raise NftError(f"cannot run {' '.join(cmd)}: {e}") from e
        try:
            async with asyncio.timeout(COMMAND_TIMEOUT):
                out, err = await proc.communicate(script.encode() if script is not None else None)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise NftError(f"{' '.join(cmd)} did not finish in {COMMAND_TIMEOUT} s") from None
        assert proc.returncode is not None
        return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")

    async def apply(self, script: str) -> None:
        """Run `script` with `nft -f -`: one transaction, all or nothing."""
        rc, _out, err = await self._nft(["-f", "-"], script)
        if rc != 0:
            raise NftError(f"nft -f - failed ({rc}): {err.strip()[:MAX_ERROR_TEXT]}")

    async def read(self) -> TableState | None:
        """The table as the kernel has it; None when there is no such table."""
        rc, out, err = await self._nft(["-j", "list", "table", self.spec.family, self.spec.table])
        if rc != 0:
            if "No such file or directory" in err:
                return None
            raise NftError(f"nft list table failed ({rc}): {err.strip()[:MAX_ERROR_TEXT]}")
        return parse_table(self.spec, out)

    async def exists(self) -> bool:
        rc, out, err = await self._nft(["-j", "list", "tables", self.spec.family])
        if rc != 0:
            raise NftError(f"nft list tables failed ({rc}): {err.strip()[:MAX_ERROR_TEXT]}")
        return (self.spec.family, self.spec.table) in parse_tables(out)

    async def sync(self, peers: AbstractSet[Address]) -> SyncResult:
        """Full pass: make the table exist in our shape and the set hold exactly `peers`."""
        state = await self.read()
        result = SyncResult()
        if state is None:
            script = table_script(self.spec, peers)
            result.created, result.added = True, len(peers)
        elif state.problems:
            script = table_script(self.spec, peers, counter=state.counter, replace=True)
            result.rebuilt = state.problems
            result.added = len(peers - state.elements)
            result.removed = len(state.elements - peers)
        else:
            admit, remove = peers - state.elements, state.elements - peers
            script = element_script(self.spec, admit, remove)
            result.added, result.removed = len(admit), len(remove)
        if script:
            await self.apply(script)
            result.transactions = 1
        return result

    async def update(self, admit: AbstractSet[Address], remove: AbstractSet[Address]) -> SyncResult:
        """Incremental pass: exactly these elements in or out; NftError when the set is gone."""
        script = element_script(self.spec, admit, remove)
        if not script:
            return SyncResult()
        await self.apply(script)
        return SyncResult(added=len(admit), removed=len(remove), transactions=1)

    async def delete(self) -> bool:
        """Remove the table; False when there was none."""
        if not await self.exists():
            return False
        await self.apply(delete_script(self.spec))
        return True

    def counter(self) -> Counter | None:
        """The drop counter now (synchronous, bounded); None when the table is absent."""
        return self.counters.read(self.spec.table, COUNTER, self.spec.family)

    def close(self) -> None:
        self.counters.close()


def describe(result: SyncResult) -> str:
    """One log phrase for a pass."""
    parts = []
    if result.created:
        parts.append("created")
    if result.rebuilt:
        parts.append(f"rebuilt ({'; '.join(result.rebuilt)})")
    parts.append(f"+{result.added} -{result.removed} elements")
    return ", ".join(parts)
