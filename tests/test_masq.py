"""--ip-masq rules in a throwaway network namespace: content, idempotence, repair, removal."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from ipaddress import IPv4Network

import pytest

from overlay.masq import FWD_CHAIN, NAT_CHAIN, Masquerade

pytestmark = pytest.mark.root

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
