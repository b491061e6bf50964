"""nftables mode (EnableNFTables): the table definition, the one-transaction script, the
fingerprint of a kernel listing (hostile input included), and the tables in a throwaway
namespace: content, idempotence, repair of hand edits and deletion, removal, one `nft -f` call
per change, both families."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlay.masq import IptablesError
from overlay.nftrules import (
    NftFamily,
    NftRules,
    delete_script,
    fingerprint,
    probe_fully_random,
    replace_script,
)

NETWORK = IPv4Network("10.50.0.0/16")
LEASE = IPv4Network("10.50.3.0/24")
NET6 = IPv6Network("fd00:50::/56")
LEASE6 = IPv6Network("fd00:50:0:3::/64")

Net = IPv4Network | IPv6Network


@st.composite
def network_and_lease(draw: st.DrawFn) -> tuple[Net, Net]:
    """A network of either family and a lease inside it (shorter prefix than the host part)."""
    version = draw(st.sampled_from([4, 6]))
    cls: type[Net] = IPv4Network if version == 4 else IPv6Network
    bits = 32 if version == 4 else 128
    prefix = draw(st.integers(1, bits - 4))
    network = cls((draw(st.integers(0, 2**bits - 1)), prefix), strict=False)
    length = draw(st.integers(prefix + 1, min(prefix + 16, bits - 2)))
    index = draw(st.integers(0, 2 ** (length - prefix) - 1))
    base = int(network.network_address) + (index << (bits - length))
    return network, cls((base, length))


def table_lines(script: str, table: str) -> list[str]:
    """The stripped lines of one `table ... {}` block in a script."""
    lines = script.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("table ") and table in line)
    end = lines.index("}", start)
    return [line.strip() for line in lines[start : end + 1]]


@given(network_and_lease(), st.booleans(), st.booleans(), st.booleans())
def test_script_is_one_replace_of_flannels_layout(
    nets: tuple[Net, Net], masq: bool, forward: bool, random_fully: bool
) -> None:
    """Whatever the networks: the script adds+deletes the table first (so the delete cannot
    fail), then defines it whole; the rules name the networks exactly as given, with the
    family's keyword and multicast range; nothing enabled means no definition at all."""
    network, lease = nets
    fam = NftFamily(network, lease, masq, forward, random_fully)
    family, table = ("ip", "flannel-ipv4") if network.version == 4 else ("ip6", "flannel-ipv6")
    script = replace_script([fam])
    lines = script.splitlines()
    assert script.endswith("\n")
    assert lines[:2] == [f"add table {family} {table}", f"delete table {family} {table}"]
    if not masq and not forward:
        assert len(lines) == 2
        return
    body = table_lines(script, table)
    assert body[0] == f"table {family} {table} {{" and body[-1] == "}"
    assert ("chain postrtg {" in body) is masq and ("chain forward {" in body) is forward
    net, pod = str(network), str(lease)
    assert ip_network(net) == network and ip_network(pod) == lease  # canonical, round trip
    mcast = "224.0.0.0/4" if network.version == 4 else "ff00::/8"
    masquerade = "masquerade fully-random" if random_fully else "masquerade"
    c, fc = 'comment "flanneld masq"', 'comment "flanneld forward"'
    expected_masq = [
        f"meta mark & 0x4000 == 0x4000 return {c}",
        f"{family} saddr {pod} {family} daddr {net} return {c}",
        f"{family} saddr {net} {family} daddr {pod} return {c}",
        f"{family} saddr != {net} {family} daddr {pod} return {c}",
        f"{family} saddr {net} {family} daddr != {mcast} {masquerade} {c}",
        f"{family} saddr != {net} {family} daddr {net} {masquerade} {c}",
    ]
    expected_fwd = [f"{family} saddr {net} accept {fc}", f"{family} daddr {net} accept {fc}"]
    rules = [x for x in body if x.startswith((family, "meta mark"))]
    assert rules == (expected_masq if masq else []) + (expected_fwd if forward else [])


def test_families_of_different_versions_are_refused() -> None:
    with pytest.raises(ValueError, match="differ in family"):
        NftFamily(NETWORK, LEASE6, True, True, True).definition()


def test_one_script_for_both_families_and_delete_script() -> None:
    both = replace_script([NftFamily(NETWORK, LEASE, True, True, True),
                           NftFamily(NET6, LEASE6, True, True, True)])  # fmt: skip
    assert "table ip flannel-ipv4 {" in both and "table ip6 flannel-ipv6 {" in both
    assert both.index("delete table ip flannel-ipv4") < both.index("table ip flannel-ipv4 {")
    # No IPv6 lease yet: the IPv6 table has the forward chain only.
    no_lease = replace_script([NftFamily(NET6, None, True, True, True)])
    assert "chain forward" in no_lease and "postrtg" not in no_lease
    assert delete_script([("ip", "a"), ("ip6", "b")]) == (
        "add table ip a\ndelete table ip a\nadd table ip6 b\ndelete table ip6 b\n"
    )


LISTING = {"nftables": [
    {"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
    {"table": {"family": "ip", "name": "flannel-ipv4", "handle": 7}},
    {"chain": {"family": "ip", "table": "flannel-ipv4", "name": "forward", "handle": 1}},
    {"rule": {"family": "ip", "chain": "forward", "handle": 2, "expr": [{"accept": None}]}},
]}  # fmt: skip


def renumbered(doc: Any, start: int) -> Any:
    """The same listing with other handles (as after a rewrite) and another metainfo."""
    if isinstance(doc, dict):
        return {k: (start + 1 if k == "handle" else renumbered(v, start)) if k != "metainfo"
                else {"version": "9"} for k, v in doc.items()}  # fmt: skip
    if isinstance(doc, list):
        return [renumbered(v, start) for v in doc]
    return doc


@given(st.integers(0, 10**6))
def test_fingerprint_ignores_handles_and_metainfo_but_not_content(start: int) -> None:
    base = fingerprint(json.dumps(LISTING))
    assert base is not None
    assert fingerprint(json.dumps(renumbered(LISTING, start))) == base
    changed = json.loads(json.dumps(LISTING))
    changed["nftables"][3]["rule"]["expr"] = [{"drop": None}]
    assert fingerprint(json.dumps(changed)) != base


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(st.one_of(st.text(), JSON.map(json.dumps),
                 st.builds(lambda d: json.dumps({"nftables": d}), JSON)))  # fmt: skip
def test_fingerprint_of_anything_is_none_or_a_canonical_string(text: str) -> None:
    """Hostile or odd output (not JSON, other shapes, only metainfo) never raises: None means
    "not a listing" and makes ensure() rewrite; a string is stable for the same input."""
    got = fingerprint(text)
    assert got is None or (isinstance(got, str) and got == fingerprint(text))
    if got is not None:
        assert isinstance(json.loads(got), list)


def test_fingerprint_of_deep_nesting_is_none_not_a_crash() -> None:
    deep = '{"nftables": [' + "[" * 100_000 + "]" * 100_000 + "]}"
    assert fingerprint(deep) is None
    assert fingerprint('{"nftables": [{"metainfo": {}}]}') is None
    assert fingerprint("\x00\xff") is None


# --------------------------------------------------------------------------- kernel


@pytest.fixture
def netns(unique: str) -> Iterator[str]:
    ns = f"ovnft{unique}"
    subprocess.run(["ip", "netns", "add", ns], check=True, timeout=10)
    try:
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


def nft(ns: str, *args: str) -> str:
    return subprocess.run(["ip", "netns", "exec", ns, "nft", *args], check=True,
                          capture_output=True, text=True, timeout=10).stdout  # fmt: skip


def listing(ns: str, family: str, table: str) -> dict[str, list[Any]]:
    """Chains (name, type, hook) and rules (chain -> list of `nft` texts) of one table."""
    doc = json.loads(nft(ns, "-j", "list", "table", family, table))["nftables"]
    chains = [(i["chain"]["name"], i["chain"]["type"], i["chain"]["hook"], i["chain"]["policy"])
              for i in doc if "chain" in i]  # fmt: skip
    return {"chains": chains, "rules": [i["rule"]["chain"] for i in doc if "rule" in i]}


@pytest.mark.root
async def test_tables_in_the_kernel_both_families(netns: str) -> None:
    prefix = ("ip", "netns", "exec", netns)
    r = NftRules(NETWORK, LEASE, ipv6=(NET6, LEASE6), prefix=prefix)
    assert await r.ensure() is True
    for family, table in (("ip", "flannel-ipv4"), ("ip6", "flannel-ipv6")):
        got = listing(netns, family, table)
        assert got["chains"] == [("postrtg", "nat", "postrouting", "accept"),
                                 ("forward", "filter", "forward", "accept")]  # fmt: skip
        assert got["rules"] == ["postrtg"] * 6 + ["forward"] * 2
    text = nft(netns, "list", "table", "ip6", "flannel-ipv6")
    assert "ip6 saddr fd00:50::/56 ip6 daddr != ff00::/8 masquerade fully-random" in text
    assert 'comment "rules for flannel-ipv6"' in text
    assert await r.ensure() is False
    await r.remove()
    assert "flannel-ipv" not in nft(netns, "list", "tables")
    await r.remove()  # twice is fine


@pytest.fixture
def call_log(tmp_path: Path, netns: str) -> tuple[tuple[str, ...], Path]:
    """A prefix that logs each command line, then runs it in `netns` (the real nft runs)."""
    log, wrapper = tmp_path / "calls", tmp_path / "logged"
    wrapper.write_text(f'#!/bin/sh\necho "$*" >> {log}\nexec "$@"\n')
    wrapper.chmod(0o755)
    return (str(wrapper), "ip", "netns", "exec", netns), log


def writes(log: Path) -> list[str]:
    """The nft calls that change something since the last look (the log is emptied)."""
    lines = log.read_text().splitlines() if log.exists() else []
    log.write_text("")
    return [c for c in lines if " list " not in c]


@pytest.mark.root
async def test_repairs_hand_edits_and_deletion_in_one_transaction(
    netns: str, call_log: tuple[tuple[str, ...], Path]
) -> None:
    prefix, log = call_log
    r = NftRules(NETWORK, LEASE, ipv6=(NET6, LEASE6), prefix=prefix)
    assert await r.ensure() is True
    assert [c.split(" nft ", 1)[1] for c in writes(log)] == ["-f -"]
    before = nft(netns, "list", "ruleset")
    assert await r.ensure() is False and writes(log) == []

    # A rule deleted by hand (by its handle), a rule added by hand, a chain flushed, the
    # table deleted: each time one transaction puts back exactly what was there.
    doc = json.loads(nft(netns, "-j", "list", "chain", "ip", "flannel-ipv4", "postrtg"))
    handle = next(i["rule"]["handle"] for i in doc["nftables"] if "rule" in i)
    edits = [
        ("delete", "rule", "ip", "flannel-ipv4", "postrtg", "handle", str(handle)),
        ("add", "rule", "ip6", "flannel-ipv6", "forward", "drop"),
        ("flush", "chain", "ip", "flannel-ipv4", "forward"),
        ("delete", "table", "ip6", "flannel-ipv6"),
    ]
    for edit in edits:
        nft(netns, *edit)
        assert await r.ensure() is True, edit
        assert len(writes(log)) == 1, edit
        assert nft(netns, "list", "ruleset") == before, edit

    # The same lease again (a re-acquisition of the same subnet): nothing to write.
    r.set_lease(LEASE, LEASE6)
    assert await r.ensure() is False and writes(log) == []

    # A new lease: one transaction, the new subnet in, the old one out.
    r.set_lease(IPv4Network("10.50.9.0/24"), LEASE6)
    assert await r.ensure() is True and len(writes(log)) == 1
    text = nft(netns, "list", "table", "ip", "flannel-ipv4")
    assert "10.50.9.0/24" in text and "10.50.3.0/24" not in text
    await r.remove()


def iptables_s(ns: str, binary: str, table: str) -> str:
    argv = ["ip", "netns", "exec", ns, binary, "-w", "5", "-t", table, "-S"]
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=10).stdout


@pytest.mark.root
async def test_prune_removes_unused_tables_and_old_iptables_chains(netns: str) -> None:
    from overlay.masq import IptablesRules

    prefix = ("ip", "netns", "exec", netns)
    await IptablesRules(NETWORK, LEASE, ipv6=(NET6, LEASE6), prefix=prefix).ensure()
    await NftRules(NETWORK, LEASE, ipv6=(NET6, LEASE6), prefix=prefix).ensure()
    now = NftRules(NETWORK, LEASE, masq=False, prefix=prefix)  # no IPv6 network any more
    await now.prune()
    await now.ensure()
    for binary in ("iptables", "ip6tables"):
        for table in ("nat", "filter"):
            assert "FLANNEL" not in iptables_s(netns, binary, table), (binary, table)
    tables = nft(netns, "list", "tables")
    assert "flannel-ipv6" not in tables and "table ip flannel-ipv4" in tables
    assert listing(netns, "ip", "flannel-ipv4")["chains"] == [
        ("forward", "filter", "forward", "accept")
    ]
    await now.remove()


@pytest.mark.root
async def test_fully_random_probe_and_a_failing_nft(netns: str, tmp_path: Path) -> None:
    prefix = ("ip", "netns", "exec", netns)
    assert await probe_fully_random(prefix) is True
    assert "overlay-probe" not in nft(netns, "list", "tables")  # checked, never committed
    # No nft on PATH: a clear error naming it and the input, no crash.
    r = NftRules(NETWORK, LEASE, prefix=(*prefix, "env", "PATH=/nonexistent"))
    with pytest.raises(IptablesError, match=r"(?s)nft -f -` failed.*nft.*its input was"):
        await r.ensure()
    missing = (str(tmp_path / "no-such-program"),)
    with pytest.raises(IptablesError, match="not found"):
        await NftRules(NETWORK, LEASE, prefix=missing).ensure()
    assert await probe_fully_random(missing) is None  # unknown, not "unsupported"


@pytest.mark.root
@settings(max_examples=25)
@given(network_and_lease(), st.booleans(), st.booleans())
def test_kernel_accepts_every_generated_table(
    nets: tuple[Net, Net], masq: bool, random_fully: bool
) -> None:
    """`nft --check` (the kernel validates, nothing is committed) takes any generated script."""
    script = replace_script([NftFamily(*nets, masq, True, random_fully)])
    done = subprocess.run(["unshare", "--net", "nft", "-c", "-f", "-"], input=script,
                          capture_output=True, text=True, timeout=10)  # fmt: skip
    assert done.returncode == 0, f"{done.stderr}\n{script}"


async def test_traffic_rules_picks_the_mode_and_families_from_the_config() -> None:
    """No kernel needed: without --ip-masq nothing is probed and nothing runs yet."""
    from ipaddress import IPv4Address

    from overlay.masq import IptablesRules, traffic_rules
    from subnetmgr.model import Lease, LeaseAttrs, NetworkConfig

    lease = Lease(LEASE, LeaseAttrs(IPv4Address("192.0.2.1")), ipv6_subnet=LEASE6)
    plain = NetworkConfig.from_json('{"Network": "10.50.0.0/16"}')
    r = await traffic_rules(plain, lease, masq=False, forward=True)
    assert isinstance(r, IptablesRules) and r.ipv6 is None
    assert [s.chain for s in r.chains] == ["FLANNEL-FWD"]
    dual = NetworkConfig.from_json(json.dumps({
        "Network": "10.50.0.0/16", "EnableNFTables": True,
        "EnableIPv6": True, "IPv6Network": str(NET6),
    }))  # fmt: skip
    n = await traffic_rules(dual, lease, masq=False, forward=True)
    assert isinstance(n, NftRules)
    assert [(f.family, f.table) for f in n.families] == [("ip", "flannel-ipv4"),
                                                        ("ip6", "flannel-ipv6")]  # fmt: skip
    assert "chain postrtg" not in n.script() and n.script().count("chain forward") == 2
