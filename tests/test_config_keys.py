"""The network config's Backend.Type and unknown keys (issue 12, the operator's path).

An unknown Backend.Type is a ConfigError (overlayctl refuses it, overlayd waits for a fix instead
of exiting into a restart loop); an unknown key is accepted with a warning that names it. Pure
unit tests and properties here; `overlayctl config set` against a real etcd at the end.
"""

from __future__ import annotations

import json
import string
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import backends
from integration.etcdserver import EtcdServer
from subnetmgr.model import (
    BACKEND_KEYS,
    CONFIG_KEYS,
    KNOWN_BACKEND_TYPES,
    MAX_WARNED_KEYS,
    ConfigError,
    NetworkConfig,
)
from tests.test_ctl import ctl, etcd_get

NETWORK = "10.1.0.0/16"


def config(backend: Any = None, **top: Any) -> NetworkConfig:
    doc: dict[str, Any] = {"Network": NETWORK, **top}
    if backend is not None:
        doc["Backend"] = backend
    return NetworkConfig.from_json(json.dumps(doc))


def test_known_types_are_the_backend_registry() -> None:
    # subnetmgr may not import backends: the two lists are pinned together here.
    assert set(KNOWN_BACKEND_TYPES) == set(backends.REGISTRY) == set(BACKEND_KEYS)


@pytest.mark.parametrize("btype", ["vxaln", "bogus", "wireguard", "ipip", "vxlan ", "host_gw"])
def test_unknown_backend_type_is_refused(btype: str) -> None:
    with pytest.raises(ConfigError, match="unknown backend type") as info:
        config({"Type": btype})
    assert info.value.field == "Backend.Type"
    assert "alloc, host-gw, udp, vxlan" in str(info.value)


def test_a_typo_gets_a_suggestion() -> None:
    with pytest.raises(ConfigError, match=r"did you mean 'vxlan'\?"):
        config({"Type": "vxaln"})


@pytest.mark.parametrize("btype", ["vxlan", "VXLAN", "udp", "host-gw", "Host-GW", "alloc"])
def test_known_backend_types_any_case(btype: str) -> None:
    c = config({"Type": btype})
    assert c.backend_type == btype and c.warnings == ()


def test_clean_configs_have_no_warnings() -> None:
    assert config().warnings == ()
    full = config(
        {"Type": "vxlan", "VNI": 4, "Port": 4789, "GBP": False, "Learning": False,
         "DirectRouting": True, "MTU": 1500, "DisableTxChecksumOffload": True,
         "FilterPeers": True},
        SubnetLen=24, SubnetMin="10.1.1.0", SubnetMax="10.1.200.0", EnableIPv4=True,
        EnableNFTables=False,
    )  # fmt: skip
    assert full.warnings == ()
    assert config({"type": "udp", "port": 8285}, subnetlen=24).warnings == ()


def test_typ_says_the_default_applies() -> None:
    # The case: "Typ" silently meant the udp default.
    c = config({"Typ": "vxlan"})
    assert c.backend_type == "udp"
    text = "\n".join(c.warnings)
    assert "Backend.'Typ'" in text and "did you mean 'Type'?" in text
    assert "Backend has no Type: the default 'udp' applies" in text


def test_unknown_top_level_and_backend_keys_are_named() -> None:
    c = config({"Type": "vxlan", "VNi": 3, "Prot": 1}, Netwrk="x", SubnetLength=24)
    top, back = c.warnings
    assert "at the top level" in top and "'Netwrk'" in top and "'SubnetLength'" in top
    assert "did you mean 'SubnetLen'?" in top
    # VNi matches VNI case-insensitively, so only Prot is unknown.
    assert "in Backend" in back and "Backend.'Prot'" in back and "VNi" not in back
    # A key another backend knows is unknown to this one.
    (w,) = config({"Type": "host-gw", "VNI": 1}).warnings
    assert "Backend.'VNI'" in w and "known: Type" in w


def test_many_and_hostile_keys_are_bounded_and_escaped() -> None:
    backend = {"Type": "udp", **{f"k{i}": i for i in range(3000)}}
    (w,) = config(backend).warnings
    assert f"and {3000 - MAX_WARNED_KEYS} more" in w and len(w) < 1000
    (w,) = config(None, **{"\x1b[31mred" + "x" * 10_000: 1}).warnings
    assert "\x1b" not in w and len(w) < 1000


def test_the_daemon_sees_the_same_config_with_or_without_warnings() -> None:
    # Warnings do not take part in equality: the config watch compares configs.
    assert config({"Type": "vxlan"}) == config({"Type": "vxlan"}, Bogus=1)


_KEY_CHARS = string.ascii_letters + string.digits + "_-\x00\x1b\u00e9"


@given(btype=st.text(max_size=40))
def test_any_backend_type_is_known_or_a_config_error(btype: str) -> None:
    try:
        c = config({"Type": btype})
    except ConfigError as e:
        assert e.field == "Backend.Type"
        assert btype.lower() not in KNOWN_BACKEND_TYPES
    else:
        assert c.backend_type == btype and btype.lower() in KNOWN_BACKEND_TYPES


@given(
    extra=st.dictionaries(st.text(_KEY_CHARS, min_size=1, max_size=12), st.integers(), max_size=12),
    btype=st.sampled_from(KNOWN_BACKEND_TYPES),
)
def test_a_warning_exactly_when_a_backend_key_is_unknown(extra: dict[str, int], btype: str) -> None:
    backend: dict[str, Any] = {"Type": btype}
    backend.update({k: v for k, v in extra.items() if k.lower() != "type"})
    known = {k.lower() for k in BACKEND_KEYS[btype]}
    unknown = [k for k in backend if k.lower() not in known]
    # Known keys may have invalid values for the backend: their checks live in the backend,
    # so parsing the config itself never fails on them.
    c = config(backend)
    assert c.backend_type == btype
    if not unknown:
        assert c.warnings == ()
    else:
        (w,) = c.warnings
        assert w.startswith("network config: unknown key") and "in Backend" in w
        named = unknown[:MAX_WARNED_KEYS]
        assert all(k.lower() not in known for k in named)


@given(st.dictionaries(st.text(_KEY_CHARS, min_size=1, max_size=12), st.none(), max_size=8))
def test_a_warning_exactly_when_a_top_level_key_is_unknown(extra: dict[str, None]) -> None:
    known = {k.lower() for k in CONFIG_KEYS}
    doc = {k: v for k, v in extra.items() if k.lower() not in known}
    c = config(None, **doc)
    assert (c.warnings != ()) == bool(doc)


# ------------------------------------------------------------------ overlayctl against etcd


def test_config_set_refuses_an_unknown_type_and_writes_nothing(
    etcd_server: EtcdServer, etcd_prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = json.dumps({"Network": NETWORK, "Backend": {"Type": "vxaln"}})
    assert ctl(etcd_server, etcd_prefix, "config", "set", bad) == 2
    err = capsys.readouterr().err
    assert "nothing written" in err and "unknown backend type" in err and "'vxlan'" in err
    assert etcd_get(etcd_server, f"{etcd_prefix}/config") == ""


def test_config_set_warns_on_unknown_keys_and_writes(
    etcd_server: EtcdServer, etcd_prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    text = json.dumps({"Network": NETWORK, "Backend": {"Typ": "vxlan"}})
    assert ctl(etcd_server, etcd_prefix, "config", "set", text) == 0
    out, err = capsys.readouterr()
    assert "backend udp" in out
    assert "warning" in err and "Backend.'Typ'" in err and "default 'udp' applies" in err
    assert etcd_get(etcd_server, f"{etcd_prefix}/config") == text
