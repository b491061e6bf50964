"""The installed flannel plugin driving the real bridge + host-local plugins in namespaces."""
# ruff: noqa: F811  (pytest fixtures imported from tests.test_cni_support are parameters)

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.test_cni_support import (  # noqa: F401  (fixtures)
    Namespaces,
    Net,
    call,
    ip_json,
    net,
    netns,
    plugin,
    write_subnet_env,
)

pytestmark = pytest.mark.root


def eth0(ns: str) -> dict[str, object]:
    links = ip_json("addr", "show", "dev", "eth0", ns=ns)
    assert len(links) == 1
    return links[0]


def v4_addrs(link: dict[str, object]) -> list[str]:
    infos = link.get("addr_info", [])
    assert isinstance(infos, list)
    return [f"{a['local']}/{a['prefixlen']}" for a in infos if a.get("family") == "inet"]


def test_add_configures_eth0_saves_conf_and_del_cleans_up(net: Net, netns: Namespaces) -> None:
    ns = netns.add("c")
    cid = f"ctr-{net.name}"
    reply = net.call("ADD", cid, ns)
    assert reply.rc == 0, reply.raw + reply.stderr
    result = reply.out
    assert result["cniVersion"] == "1.0.0"
    (ip,) = result["ips"]
    assert ip["address"].startswith("10.244.7.") and ip["address"].endswith("/24")
    assert ip["gateway"] == "10.244.7.1"
    assert "version" not in ip

    # The kernel: eth0 with that address, the subnet.env MTU, a route to the whole network.
    link = eth0(ns)
    assert v4_addrs(link) == [ip["address"]]
    assert link["mtu"] == 1400
    routes = ip_json("route", "show", "10.244.0.0/16", ns=ns)
    assert [(r["dst"], r.get("gateway")) for r in routes] == [("10.244.0.0/16", "10.244.7.1")]
    bridge = ip_json("addr", "show", "dev", net.bridge, ns=net.host)
    assert v4_addrs(bridge[0]) == ["10.244.7.1/24"]

    # The saved delegate conf: 0700 dir, 0600 file, keyed by container ID and ifname.
    saved_path = net.data_dir / f"{cid}-eth0"
    assert net.data_dir.stat().st_mode & 0o777 == 0o700
    assert saved_path.stat().st_mode & 0o777 == 0o600
    saved = json.loads(saved_path.read_text())
    assert saved["type"] == "bridge" and saved["bridge"] == net.bridge
    assert saved["ipam"]["ranges"] == [[{"subnet": "10.244.7.0/24"}]]
    assert saved["overlay.attachment"] == {"containerID": cid, "ifname": "eth0"}
    address = ip["address"].split("/")[0]
    assert net.allocations() == {address: f"{cid}\r\neth0"}

    reply = net.call("DEL", cid, ns)
    assert reply.rc == 0, reply.raw + reply.stderr
    assert ip_json("link", "show", ns=ns) and not any(
        link["ifname"] == "eth0" for link in ip_json("link", "show", ns=ns)
    )
    assert net.allocations() == {}
    assert not saved_path.exists()

    # DEL twice succeeds, and so does DEL once the namespace is gone.
    assert net.call("DEL", cid, ns).rc == 0
    netns.remove(ns)
    assert net.call("DEL", cid, netns_path=f"/run/netns/{ns}").rc == 0


def test_del_after_namespace_is_gone_releases_the_address(net: Net, netns: Namespaces) -> None:
    ns = netns.add("c")
    cid = f"gone-{net.name}"
    assert net.call("ADD", cid, ns).rc == 0
    assert len(net.allocations()) == 1
    netns.remove(ns)
    reply = net.call("DEL", cid, netns_path=f"/run/netns/{ns}")
    assert reply.rc == 0, reply.raw + reply.stderr
    assert net.allocations() == {}
    assert not (net.data_dir / f"{cid}-eth0").exists()
    # Without CNI_NETNS at all, too.
    assert net.call("DEL", cid).rc == 0


def test_del_reads_flannels_old_saved_conf_name(net: Net, netns: Namespaces) -> None:
    ns = netns.add("c")
    cid = f"old-{net.name}"
    assert net.call("ADD", cid, ns).rc == 0
    # What flannel itself would have left: the same conf under the container ID alone.
    new = net.data_dir / f"{cid}-eth0"
    old = net.data_dir / cid
    saved = json.loads(new.read_text())
    del saved["overlay.attachment"]
    old.write_text(json.dumps(saved))
    new.unlink()
    reply = net.call("DEL", cid, ns)
    assert reply.rc == 0, reply.raw + reply.stderr
    assert not old.exists()
    assert net.allocations() == {}
    assert not any(link["ifname"] == "eth0" for link in ip_json("link", "show", ns=ns))


def test_two_interfaces_of_one_container_do_not_collide(net: Net, netns: Namespaces) -> None:
    ns = netns.add("c")
    cid = f"two-{net.name}"
    assert net.call("ADD", cid, ns, ifname="eth0").rc == 0
    assert net.call("ADD", cid, ns, ifname="net1").rc == 0
    assert sorted(p.name for p in net.data_dir.iterdir() if not p.name.startswith(".")) == [
        f"{cid}-eth0",
        f"{cid}-net1",
    ]
    assert len(net.allocations()) == 2
    assert net.call("DEL", cid, ns, ifname="eth0").rc == 0
    assert list(net.allocations().values()) == [f"{cid}\r\nnet1"]
    assert net.call("DEL", cid, ns, ifname="net1").rc == 0
    assert net.allocations() == {}


@pytest.mark.parametrize(
    ("version", "has_ip_version"),
    [("0.3.0", True), ("0.3.1", True), ("0.4.0", True), ("1.0.0", False), ("1.1.0", False)],
)
def test_result_format_per_cni_version(
    net: Net, netns: Namespaces, version: str, has_ip_version: bool
) -> None:
    ns = netns.add("c")
    cid = f"v-{net.name}"
    reply = net.call("ADD", cid, ns, version=version)
    assert reply.rc == 0, reply.raw + reply.stderr
    assert reply.out["cniVersion"] == version
    (ip,) = reply.out["ips"]
    assert ("version" in ip) is has_ip_version
    if has_ip_version:
        assert ip["version"] == "4"
    # ips[].interface indexes interfaces: the container side is eth0 in our namespace.
    iface = reply.out["interfaces"][ip["interface"]]
    assert iface["name"] == "eth0" and iface["sandbox"] == f"/run/netns/{ns}"
    assert net.call("DEL", cid, ns, version=version).rc == 0
    assert net.allocations() == {}


@pytest.mark.parametrize("version", ["0.4.0", "1.0.0", "1.1.0"])
def test_check_passes_then_notices_a_removed_interface(
    net: Net, netns: Namespaces, version: str
) -> None:
    ns = netns.add("c")
    cid = f"chk-{net.name}"
    add = net.call("ADD", cid, ns, version=version)
    assert add.rc == 0
    conf = net.conf(version, prevResult=add.out)
    ok = net.call("CHECK", cid, ns, conf=conf)
    assert ok.rc == 0, ok.raw + ok.stderr
    subprocess.run(["ip", "-n", ns, "link", "del", "eth0"], check=True, timeout=30)
    bad = net.call("CHECK", cid, ns, conf=conf)
    assert bad.rc != 0
    assert "eth0" in bad.out.get("msg", "") + bad.out.get("details", "")
    assert net.call("DEL", cid, ns).rc == 0


def test_check_notices_a_changed_subnet_lease(net: Net, netns: Namespaces) -> None:
    ns = netns.add("c")
    cid = f"lease-{net.name}"
    add = net.call("ADD", cid, ns)
    assert add.rc == 0
    write_subnet_env(net.subnet_env, subnet="10.244.9.1/24")
    bad = net.call("CHECK", cid, ns, conf=net.conf(prevResult=add.out))
    assert bad.rc != 0 and bad.code == 103
    assert "10.244.9.0/24" in bad.out["msg"]
    assert net.call("DEL", cid, ns).rc == 0  # DEL still uses what was saved at ADD
    assert net.allocations() == {}


def test_check_of_an_unknown_container_is_code_3(net: Net, netns: Namespaces) -> None:
    ns = netns.add("c")
    reply = net.call("CHECK", "never-added", ns, conf=net.conf(prevResult={}))
    assert reply.rc != 0 and reply.code == 3


def test_gc_releases_attachments_outside_the_valid_list(net: Net, netns: Namespaces) -> None:
    spaces = [netns.add(f"g{i}") for i in range(3)]
    cids = [f"gc{i}-{net.name}" for i in range(3)]
    for cid, ns in zip(cids, spaces, strict=True):
        assert net.call("ADD", cid, ns).rc == 0
    assert len(net.allocations()) == 3
    keep = cids[0]
    conf = net.conf(
        "1.1.0", **{"cni.dev/valid-attachments": [{"containerID": keep, "ifname": "eth0"}]}
    )
    reply = net.call("GC", "", conf=conf)
    assert reply.rc == 0, reply.raw + reply.stderr
    left = sorted(p.name for p in net.data_dir.iterdir() if not p.name.startswith("."))
    assert left == [f"{keep}-eth0"]
    assert list(net.allocations().values()) == [f"{keep}\r\neth0"]
    # A missing key means that nothing is valid.
    reply = net.call("GC", "", conf=net.conf("1.1.0"))
    assert reply.rc == 0, reply.raw + reply.stderr
    assert net.allocations() == {}
    assert [p.name for p in net.data_dir.iterdir() if not p.name.startswith(".")] == []


def test_status_fails_while_subnet_env_is_absent(net: Net) -> None:
    net.subnet_env.unlink()
    reply = net.call("STATUS", "", conf=net.conf("1.1.0"))
    assert reply.rc != 0 and reply.code == 50
    assert str(net.subnet_env) in reply.out["msg"]
    write_subnet_env(net.subnet_env)
    reply = net.call("STATUS", "", conf=net.conf("1.1.0"))
    assert reply.rc == 0, reply.raw + reply.stderr


def test_fifty_parallel_adds_get_distinct_addresses_and_dels_clean_up(
    net: Net, netns: Namespaces
) -> None:
    count = 50
    spaces = [netns.add(f"p{i}") for i in range(count)]
    cids = [f"par{i}-{net.name}" for i in range(count)]
    conf_file = net.data_dir.parent / "parallel.json"
    conf_file.write_text(json.dumps(net.conf()))

    def start(command: str, cid: str, ns: str) -> subprocess.Popen[bytes]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin"),
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": cid,
            "CNI_IFNAME": "eth0",
            "CNI_NETNS": f"/run/netns/{ns}",
            "CNI_PATH": f"{net.plugin.parent}:/usr/lib/cni",
        }
        with conf_file.open("rb") as stdin:
            return subprocess.Popen(
                ["ip", "netns", "exec", net.host, str(net.plugin)],
                stdin=stdin,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
            )

    def finish(procs: list[subprocess.Popen[bytes]]) -> list[dict[str, object]]:
        results = []
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, (out + err).decode()
            results.append(json.loads(out) if out.strip() else {})
        return results

    adds = finish([start("ADD", c, n) for c, n in zip(cids, spaces, strict=True)])
    addresses = [r["ips"][0]["address"] for r in adds]  # type: ignore[index]
    assert len(set(addresses)) == count
    assert all(a.startswith("10.244.7.") for a in addresses)
    for ns, address in zip(spaces, addresses, strict=True):
        assert v4_addrs(eth0(ns)) == [address]
    assert len(net.allocations()) == count
    assert len([p for p in net.data_dir.iterdir() if not p.name.startswith(".")]) == count

    finish([start("DEL", c, n) for c, n in zip(cids, spaces, strict=True)])
    assert net.allocations() == {}
    assert [p.name for p in net.data_dir.iterdir() if not p.name.startswith(".")] == []


def test_failed_delegate_add_leaves_nothing_behind(net: Net, netns: Namespaces) -> None:
    ns = netns.add("c")
    cid = f"fail-{net.name}"
    # ADD into an ifname that already exists in the namespace: the bridge plugin refuses.
    subprocess.run(
        ["ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", "x0"],
        check=True,
        timeout=30,
    )
    reply = net.call("ADD", cid, ns)
    assert reply.rc != 0 and isinstance(reply.code, int)
    assert net.allocations() == {}
    assert not (net.data_dir / f"{cid}-eth0").exists()


def test_a_delegate_add_that_half_succeeded_is_undone(net: Net, netns: Namespaces) -> None:
    """The real bridge does all its ADD work (veth, address from host-local), then its
    wrapper fails, as a delegate that crashes late would: the plugin runs the bridge's DEL,
    which releases the address and removes the veth, and removes the saved conf."""
    ns = netns.add("c")
    log = net.data_dir.parent / "half.log"
    wrapper = net.plugin.parent / "halfbridge"  # a thin wrapper: the work is the real bridge's
    wrapper.write_text(
        "#!/bin/sh\n"
        f'echo "$CNI_COMMAND" >> {log}\n'
        'if [ "$CNI_COMMAND" = ADD ]; then /usr/lib/cni/bridge > /dev/null; exit 1; fi\n'
        "exec /usr/lib/cni/bridge\n"
    )
    wrapper.chmod(0o755)
    conf = net.conf()
    conf["delegate"].update(type="halfbridge", isGateway=True)
    cid = f"half-{net.name}"
    reply = net.call("ADD", cid, ns, conf=conf)
    assert reply.rc != 0 and reply.code == 102, reply.raw
    assert "failed with exit status 1" in reply.out["msg"] and "Traceback" not in reply.stderr
    assert log.read_text().split() == ["ADD", "DEL"]
    assert net.allocations() == {}  # the address host-local handed out is free again
    assert [link["ifname"] for link in ip_json("link", "show", ns=ns)] == ["lo"]  # no eth0
    assert [p.name for p in net.data_dir.iterdir() if not p.name.startswith(".")] == []


def test_missing_delegate_plugin_is_a_clear_error(net: Net, netns: Namespaces) -> None:
    ns = netns.add("c")
    conf = net.conf()
    conf["delegate"]["type"] = "nosuchplugin"
    reply = net.call("ADD", f"np-{net.name}", ns, conf=conf)
    assert reply.rc != 0 and reply.code == 101
    assert "nosuchplugin" in reply.out["msg"]
    assert not net.data_dir.exists()  # checked before anything is written


def test_a_delegate_that_refuses_the_version_is_asked_once(net: Net, netns: Namespaces) -> None:
    """A 1.1.0 network on the 1.0.0 reference bridge: the first call learns (refused ADD,
    VERSION, ADD at 1.0.0), later calls go straight to 1.0.0, until the binary changes."""
    log = net.data_dir.parent / "delegate.log"
    wrapper = net.plugin.parent / "logbridge"  # logs each call, then runs the real bridge
    wrapper.write_text(
        "#!/bin/sh\n"
        'conf="$(cat)"\n'
        'version="$(printf %s "$conf" | grep -o \'"cniVersion":"[0-9.]*"\' | head -n 1)"\n'
        f'echo "$CNI_COMMAND $CNI_CONTAINERID $version" >> {log}\n'
        'printf %s "$conf" | exec /usr/lib/cni/bridge\n'
    )
    wrapper.chmod(0o755)
    conf = net.conf("1.1.0")
    conf["delegate"].update(type="logbridge", isGateway=True)

    def calls() -> list[str]:
        lines = log.read_text().splitlines() if log.exists() else []
        log.unlink(missing_ok=True)
        return [line.replace('"cniVersion":', "").replace('"', "") for line in lines]

    first, second, third = netns.add("a"), netns.add("b"), netns.add("c")
    reply = net.call("ADD", "v1", first, conf=conf)
    assert reply.rc == 0 and reply.out["cniVersion"] == "1.1.0", reply.raw + reply.stderr
    assert calls() == ["ADD v1 1.1.0", "VERSION v1 0.3.0", "ADD v1 1.0.0"]
    reply = net.call("ADD", "v2", second, conf=conf)
    assert reply.rc == 0 and reply.out["cniVersion"] == "1.1.0", reply.raw + reply.stderr
    assert calls() == ["ADD v2 1.0.0"]
    assert net.call("DEL", "v1", first, conf=conf).rc == 0
    assert calls() == ["DEL v1 1.0.0"]
    cache = net.data_dir / ".delegate-versions"
    assert (cache.stat().st_mode & 0o777) == 0o600
    assert json.loads(cache.read_text())[str(wrapper)]["versions"][-1] == "1.0.0"
    # An upgraded delegate binary (new mtime) is asked again.
    st = wrapper.stat()
    os.utime(wrapper, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    reply = net.call("ADD", "v3", third, conf=conf)
    assert reply.rc == 0, reply.raw + reply.stderr
    assert calls() == ["ADD v3 1.1.0", "VERSION v3 0.3.0", "ADD v3 1.0.0"]
    for cid, ns in (("v2", second), ("v3", third)):
        assert net.call("DEL", cid, ns, conf=conf).rc == 0
    assert net.allocations() == {}
