"""--ip-masq rules in a throwaway network namespace: content, idempotence, repair, removal, and
changes applied atomically (one iptables-restore per table; a concurrent reader never sees the
chain empty or half written)."""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import subprocess
from collections.abc import Iterator
from ipaddress import IPv4Network
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from integration.netns import kill_group
from overlay.masq import FWD_CHAIN, NAT_CHAIN, ChainSpec, Masquerade, masq_chains, restore_input

NETWORK = IPv4Network("10.50.0.0/16")
LEASE = IPv4Network("10.50.3.0/24")


@pytest.fixture
def netns(unique: str) -> Iterator[str]:
    ns = f"ovmq{unique}"
    subprocess.run(["ip", "netns", "add", ns], check=True, timeout=10)
    try:
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


def rules(ns: str, table: str) -> list[str]:
    out = subprocess.run(
        ["ip", "netns", "exec", ns, "iptables", "-w", "5", "-t", table, "-S"],
        check=True, capture_output=True, text=True, timeout=10,
    )  # fmt: skip
    return [line for line in out.stdout.splitlines() if "FLANNEL" in line]


def iptables(ns: str, *args: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, "iptables", "-w", "5", *args], check=True,
                   capture_output=True, timeout=10)  # fmt: skip


@pytest.mark.root
async def test_rules_match_flannel(netns: str) -> None:
    m = Masquerade(NETWORK, LEASE, prefix=("ip", "netns", "exec", netns))
    assert await m.ensure() is True
    c = '-m comment --comment "flanneld masq"'
    assert rules(netns, "nat") == [
        f"-N {NAT_CHAIN}",
        f"-A POSTROUTING {c} -j {NAT_CHAIN}",
        f"-A {NAT_CHAIN} -m mark --mark 0x4000/0x4000 {c} -j RETURN",
        f"-A {NAT_CHAIN} -s 10.50.3.0/24 -d 10.50.0.0/16 {c} -j RETURN",
        f"-A {NAT_CHAIN} -s 10.50.0.0/16 -d 10.50.3.0/24 {c} -j RETURN",
        f"-A {NAT_CHAIN} ! -s 10.50.0.0/16 -d 10.50.3.0/24 {c} -j RETURN",
        f"-A {NAT_CHAIN} -s 10.50.0.0/16 ! -d 224.0.0.0/4 {c} -j MASQUERADE --random-fully",
        f"-A {NAT_CHAIN} ! -s 10.50.0.0/16 -d 10.50.0.0/16 {c} -j MASQUERADE --random-fully",
    ]
    f = '-m comment --comment "flanneld forward"'
    assert rules(netns, "filter") == [
        f"-N {FWD_CHAIN}",
        f"-A FORWARD {f} -j {FWD_CHAIN}",
        f"-A {FWD_CHAIN} -s 10.50.0.0/16 {f} -j ACCEPT",
        f"-A {FWD_CHAIN} -d 10.50.0.0/16 {f} -j ACCEPT",
    ]


@pytest.mark.root
async def test_idempotent_and_repairs(netns: str) -> None:
    m = Masquerade(NETWORK, LEASE, prefix=("ip", "netns", "exec", netns))
    await m.ensure()
    before = rules(netns, "nat"), rules(netns, "filter")
    assert await m.ensure() is False
    assert (rules(netns, "nat"), rules(netns, "filter")) == before

    # Someone deletes a rule, and the jump to the forward chain: the next pass restores both.
    iptables(netns, "-t", "nat", "-D", NAT_CHAIN, "-s", "10.50.0.0/16", "!", "-d",
             "224.0.0.0/4", "-m", "comment", "--comment", "flanneld masq",
             "-j", "MASQUERADE", "--random-fully")  # fmt: skip
    iptables(netns, "-D", "FORWARD", "-m", "comment", "--comment", "flanneld forward",
             "-j", FWD_CHAIN)  # fmt: skip
    assert await m.ensure() is True
    assert (rules(netns, "nat"), rules(netns, "filter")) == before

    # A flushed table (e.g. `iptables -t nat -F; -X`) is rebuilt too.
    iptables(netns, "-t", "nat", "-F")
    iptables(netns, "-t", "nat", "-X", NAT_CHAIN)
    assert await m.ensure() is True
    assert rules(netns, "nat") == before[0]


@pytest.mark.root
async def test_new_lease_replaces_old_rules_and_remove(netns: str) -> None:
    m = Masquerade(NETWORK, LEASE, prefix=("ip", "netns", "exec", netns))
    await m.ensure()
    m.set_lease(NETWORK, IPv4Network("10.50.9.0/24"))
    assert await m.ensure() is True
    nat = "\n".join(rules(netns, "nat"))
    assert "10.50.9.0/24" in nat and "10.50.3.0/24" not in nat
    assert nat.count(f'-A POSTROUTING -m comment --comment "flanneld masq" -j {NAT_CHAIN}') == 1
    await m.remove()
    assert rules(netns, "nat") == [] and rules(netns, "filter") == []
    await m.remove()  # twice is fine


@pytest.fixture
def call_log(tmp_path: Path, netns: str) -> tuple[tuple[str, ...], Path]:
    """A prefix that appends each command line to a file, then runs it in `netns`: the real
    iptables and iptables-restore run, and the test can count them."""
    log, wrapper = tmp_path / "calls", tmp_path / "logged"
    wrapper.write_text(f'#!/bin/sh\necho "$*" >> {log}\nexec "$@"\n')
    wrapper.chmod(0o755)
    return (str(wrapper), "ip", "netns", "exec", netns), log


def calls(log: Path) -> list[str]:
    """The calls since the last look (the log is emptied)."""
    lines = log.read_text().splitlines() if log.exists() else []
    log.write_text("")
    return lines


def writes(lines: list[str]) -> list[str]:
    """Calls that change rules: iptables-restore, or an iptables command other than a check."""
    reads = (" -S ", " -C ")
    return [c for c in lines if "iptables-restore" in c or not any(r in c for r in reads)]


@pytest.mark.root
async def test_each_change_is_one_iptables_restore_per_table(
    netns: str, call_log: tuple[tuple[str, ...], Path]
) -> None:
    prefix, log = call_log
    m = Masquerade(NETWORK, LEASE, prefix=prefix)
    assert await m.ensure() is True
    done = calls(log)
    assert [c.split("iptables-restore ")[1] for c in writes(done)] == ["-w 5 --noflush"] * 2
    nat, fwd = rules(netns, "nat"), rules(netns, "filter")
    assert len(nat) == 8 and len(fwd) == 4  # exactly as test_rules_match_flannel pins them

    # Nothing differs: checks only.
    assert await m.ensure() is False
    assert writes(calls(log)) == []

    # A rule deleted by hand: the nat table only, in one transaction, same rules as before.
    iptables(netns, "-t", "nat", "-D", NAT_CHAIN, "2")
    assert await m.ensure() is True
    assert len(writes(calls(log))) == 1
    assert (rules(netns, "nat"), rules(netns, "filter")) == (nat, fwd)

    # Only the jump missing: one transaction that inserts it, the chain is not rewritten.
    iptables(netns, "-D", "FORWARD", "-m", "comment", "--comment", "flanneld forward",
             "-j", FWD_CHAIN)  # fmt: skip
    assert await m.ensure() is True
    assert len(writes(calls(log))) == 1
    assert rules(netns, "filter") == fwd

    # A new lease: the nat chain rewritten in one call, filter (network only) untouched.
    m.set_lease(NETWORK, IPv4Network("10.50.9.0/24"))
    assert await m.ensure() is True
    assert len(writes(calls(log))) == 1
    assert rules(netns, "filter") == fwd
    await m.remove()


@contextlib.contextmanager
def chain_reader(netns: str, out: Path) -> Iterator[None]:
    """A process in `netns` printing, in a loop, how many rules the nat chain has."""
    count = f'iptables -w 5 -t nat -S {NAT_CHAIN} | grep -c "^-A {NAT_CHAIN} "'
    with out.open("wb") as sink:
        reader = subprocess.Popen(["ip", "netns", "exec", netns, "sh", "-c",
                                   f"while :; do {count}; done"],
                                  stdout=sink, stderr=subprocess.DEVNULL,
                                  start_new_session=True)  # fmt: skip
    try:
        yield
    finally:
        kill_group(reader)


@pytest.mark.root
async def test_a_reader_never_sees_the_chain_empty_or_partial_mid_update(
    netns: str, tmp_path: Path
) -> None:
    m = Masquerade(NETWORK, LEASE, prefix=("ip", "netns", "exec", netns))
    await m.ensure()
    seen = tmp_path / "seen"
    with chain_reader(netns, seen):
        for _ in range(1000):  # until the reader has printed once
            if seen.stat().st_size:
                break
            await asyncio.sleep(0.01)
        before = seen.stat().st_size
        assert before, "the reader never ran"
        for i in range(40):  # every pass rewrites the whole chain (the lease changes)
            m.set_lease(NETWORK, IPv4Network(f"10.50.{10 + i % 2}.0/24"))
            assert await m.ensure() is True
        during = seen.read_bytes()[before:]
    counts = [int(x) for x in during.split()]
    assert counts, "the reader saw nothing while the chain was rewritten"
    assert set(counts) == {6}, f"the chain was seen with {sorted(set(counts))} rules"
    await m.remove()


@st.composite
def network_and_lease(draw: st.DrawFn) -> tuple[IPv4Network, IPv4Network]:
    prefix = draw(st.integers(8, 28))
    network = IPv4Network((draw(st.integers(0, 2**32 - 1)), prefix), strict=False)
    length = draw(st.integers(prefix + 2, min(prefix + 16, 30)))
    index = draw(st.integers(0, 2 ** (length - prefix) - 1))
    base = int(network.network_address) + (index << (32 - length))
    return network, IPv4Network((base, length))


@given(network_and_lease(), st.booleans(), st.booleans())
def test_restore_input_reads_back_as_the_rules(
    nets: tuple[IPv4Network, IPv4Network], write_rules: bool, write_jump: bool
) -> None:
    """What iptables-restore reads (quoted words, as shlex splits them) is exactly the rules,
    declared chain first and the jump last, one table and one COMMIT."""
    for spec in masq_chains(*nets):
        text = restore_input(spec, rules=write_rules, jump=write_jump)
        lines = text.splitlines()
        assert text.endswith("\n") and lines[0] == f"*{spec.table}" and lines[-1] == "COMMIT"
        body = [shlex.split(line) for line in lines[1:-1]]
        expected: list[list[str]] = []
        if write_rules:
            expected.append([f":{spec.chain}", "-", "[0:0]"])
            expected += [["-A", spec.chain, *rule] for rule in spec.rules]
        if write_jump:
            jump = ["-m", "comment", "--comment", spec.comment, "-j", spec.chain]
            expected.append(["-I", spec.parent, "1", *jump])
        assert body == expected


UNQUOTABLE = st.one_of(
    st.just(""),
    st.builds(lambda a, c, b: a + c + b, st.text(max_size=8),
              st.sampled_from(['"', "'", "\\", "\n", "\r", "\x00"]), st.text(max_size=8)),
)  # fmt: skip


@given(UNQUOTABLE)
def test_restore_input_refuses_words_it_cannot_quote(bad: str) -> None:
    spec = masq_chains(NETWORK, LEASE)[0]
    spec = ChainSpec(spec.table, spec.chain, spec.parent, bad, spec.rules)
    with pytest.raises(ValueError, match="not an iptables-restore argument"):
        restore_input(spec, rules=False, jump=True)
