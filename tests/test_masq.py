"""--ip-masq and forward rules (iptables) in a throwaway network namespace: content,
idempotence, repair, removal, and changes applied atomically (one iptables-restore per table; a
concurrent reader never sees the chain empty or half written); IPv6, the --random-fully probe
and its fallback, and pruning what is not enabled (also the nftables tables of another mode)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shlex
import subprocess
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network, IPv6Network
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from integration.netns import kill_group
from overlay.masq import (
    FWD_CHAIN,
    NAT_CHAIN,
    ChainSpec,
    IptablesRules,
    masq_chains,
    probe_random_fully,
    restore_input,
    traffic_rules,
)
from overlay.nftrules import NftRules
from subnetmgr.model import Lease, LeaseAttrs, NetworkConfig

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
    m = IptablesRules(NETWORK, LEASE, prefix=("ip", "netns", "exec", netns))
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
    m = IptablesRules(NETWORK, LEASE, prefix=("ip", "netns", "exec", netns))
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
    m = IptablesRules(NETWORK, LEASE, prefix=("ip", "netns", "exec", netns))
    await m.ensure()
    m.set_lease(IPv4Network("10.50.9.0/24"))
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
    m = IptablesRules(NETWORK, LEASE, prefix=prefix)
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
    m.set_lease(IPv4Network("10.50.9.0/24"))
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
    m = IptablesRules(NETWORK, LEASE, prefix=("ip", "netns", "exec", netns))
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
            m.set_lease(IPv4Network(f"10.50.{10 + i % 2}.0/24"))
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


def chains(ns: str, binary: str = "iptables") -> dict[str, list[str]]:
    """Our chains and jumps per table, as `-S` prints them."""
    out = {}
    for table in ("nat", "filter"):
        argv = ["ip", "netns", "exec", ns, binary, "-w", "5", "-t", table, "-S"]
        text = subprocess.run(argv, check=True, capture_output=True, text=True,
                              timeout=10).stdout  # fmt: skip
        out[table] = [line for line in text.splitlines() if "FLANNEL" in line]
    return out


@pytest.mark.root
async def test_forward_rules_alone_are_flannels_and_masq_alone_has_no_forward(netns: str) -> None:
    prefix = ("ip", "netns", "exec", netns)
    fwd_only = IptablesRules(NETWORK, LEASE, masq=False, forward=True, prefix=prefix)
    assert await fwd_only.ensure() is True
    f = '-m comment --comment "flanneld forward"'
    assert chains(netns) == {"nat": [], "filter": [
        f"-N {FWD_CHAIN}",
        f"-A FORWARD {f} -j {FWD_CHAIN}",
        f"-A {FWD_CHAIN} -s 10.50.0.0/16 {f} -j ACCEPT",
        f"-A {FWD_CHAIN} -d 10.50.0.0/16 {f} -j ACCEPT",
    ]}  # fmt: skip
    assert await fwd_only.ensure() is False
    await fwd_only.remove()

    masq_only = IptablesRules(NETWORK, LEASE, masq=True, forward=False, prefix=prefix)
    assert await masq_only.ensure() is True
    got = chains(netns)
    assert got["filter"] == [] and len(got["nat"]) == 8
    await masq_only.remove()
    assert chains(netns) == {"nat": [], "filter": []}


@pytest.mark.root
async def test_ipv6_chains_with_ip6tables_and_without_random_fully(netns: str) -> None:
    v6net, v6lease = IPv6Network("fd00:50::/56"), IPv6Network("fd00:50:0:3::/64")
    m = IptablesRules(NETWORK, LEASE, ipv6=(v6net, v6lease), random_fully=False,
                      prefix=("ip", "netns", "exec", netns))  # fmt: skip
    assert await m.ensure() is True
    c = '-m comment --comment "flanneld masq"'
    f = '-m comment --comment "flanneld forward"'
    assert chains(netns, "ip6tables") == {"nat": [
        f"-N {NAT_CHAIN}",
        f"-A POSTROUTING {c} -j {NAT_CHAIN}",
        f"-A {NAT_CHAIN} -m mark --mark 0x4000/0x4000 {c} -j RETURN",
        f"-A {NAT_CHAIN} -s fd00:50:0:3::/64 -d fd00:50::/56 {c} -j RETURN",
        f"-A {NAT_CHAIN} -s fd00:50::/56 -d fd00:50:0:3::/64 {c} -j RETURN",
        f"-A {NAT_CHAIN} ! -s fd00:50::/56 -d fd00:50:0:3::/64 {c} -j RETURN",
        f"-A {NAT_CHAIN} -s fd00:50::/56 ! -d ff00::/8 {c} -j MASQUERADE",
        f"-A {NAT_CHAIN} ! -s fd00:50::/56 -d fd00:50::/56 {c} -j MASQUERADE",
    ], "filter": [
        f"-N {FWD_CHAIN}",
        f"-A FORWARD {f} -j {FWD_CHAIN}",
        f"-A {FWD_CHAIN} -s fd00:50::/56 {f} -j ACCEPT",
        f"-A {FWD_CHAIN} -d fd00:50::/56 {f} -j ACCEPT",
    ]}  # fmt: skip
    v4 = chains(netns)
    assert v4["nat"][-1].endswith("-j MASQUERADE") and len(v4["filter"]) == 4
    assert await m.ensure() is False
    await m.remove()
    assert chains(netns, "ip6tables") == chains(netns) == {"nat": [], "filter": []}


@pytest.mark.root
async def test_prune_takes_out_what_is_not_enabled_and_the_nft_tables(netns: str) -> None:
    """Flipping --ip-masq off or EnableNFTables back to false leaves no old rules behind."""
    prefix = ("ip", "netns", "exec", netns)
    await IptablesRules(NETWORK, LEASE, prefix=prefix).ensure()
    nft = NftRules(NETWORK, LEASE, prefix=prefix)
    await nft.ensure()
    assert len(chains(netns)["nat"]) == 8
    assert "flannel-ipv4" in nft_tables(netns)

    now = IptablesRules(NETWORK, LEASE, masq=False, prefix=prefix)
    await now.prune()
    await now.ensure()
    assert chains(netns)["nat"] == [] and len(chains(netns)["filter"]) == 4
    assert "flannel-ipv" not in nft_tables(netns)
    await now.prune()  # nothing left to prune: fine
    await now.remove()


def nft_tables(ns: str) -> str:
    return subprocess.run(["ip", "netns", "exec", ns, "nft", "list", "tables"], check=True,
                          capture_output=True, text=True, timeout=10).stdout  # fmt: skip


@pytest.fixture
def old_iptables(tmp_path: Path) -> Path:
    """A test double for an iptables too old for --random-fully (the one installed here knows
    it): an iptables-restore that rejects input naming it, and passes anything else on."""
    bindir = tmp_path / "oldbin"
    bindir.mkdir()
    fake = bindir / "iptables-restore"
    fake.write_text('#!/bin/sh\ninput=$(cat)\ncase "$input" in *--random-fully*)\n'
                    '  echo \'unknown option "--random-fully"\' >&2; exit 2;;\nesac\n'
                    'printf "%s\\n" "$input" | exec /usr/sbin/iptables-restore "$@"\n')  # fmt: skip
    fake.chmod(0o755)
    return bindir


@pytest.mark.root
async def test_random_fully_is_probed_and_plain_masquerade_is_the_fallback(
    netns: str, old_iptables: Path, caplog: pytest.LogCaptureFixture
) -> None:
    prefix = ("ip", "netns", "exec", netns)
    assert await probe_random_fully(prefix) is True
    assert chains(netns) == {"nat": [], "filter": []}  # the probe commits nothing

    old = ("env", f"PATH={old_iptables}:/usr/sbin:/usr/bin:/sbin:/bin", *prefix)
    assert await probe_random_fully(old) is False
    config = NetworkConfig.from_json('{"Network": "10.50.0.0/16"}')
    lease = Lease(subnet=LEASE, attrs=LeaseAttrs(public_ip=IPv4Address("192.0.2.1")))
    with caplog.at_level(logging.WARNING, logger="overlay.masq"):
        rules = await traffic_rules(config, lease, masq=True, forward=True, prefix=old)
    assert "does not support fully random" in caplog.text
    assert await rules.ensure() is True
    nat = chains(netns)["nat"]
    assert nat[-2].endswith("-j MASQUERADE") and nat[-1].endswith("-j MASQUERADE")

    # --ip-masq-fully-random-disable: plain MASQUERADE without probing or warning.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="overlay.masq"):
        rules = await traffic_rules(config, lease, masq=True, forward=True,
                                    random_fully_disable=True, prefix=prefix)  # fmt: skip
    assert caplog.text == ""
    assert isinstance(rules, IptablesRules) and rules.random_fully is False
    await rules.remove()
