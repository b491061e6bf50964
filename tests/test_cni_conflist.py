"""The plugin handed a conflist by hand (issue 12): it says so, and the docs' jq line works.

The installed plugin is exec'd as a runtime execs it (no root, no delegate reached): the
conflist `overlayctl install-cni` writes gives error 7 naming the "plugins" key, not a missing
field or a missing subnet.env; the one plugin conf that docs/cni.md's jq line makes from that
same conflist parses, and the plugin then goes on to the next step (the subnet.env it reads).
"""

# ruff: noqa: F811  (pytest fixtures imported from tests.test_cni_support are parameters)

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cni import flannel
from cni.install import default_conflist
from tests.test_cni_hostile import assert_error, run_plugin
from tests.test_cni_support import plugin  # noqa: F401  (fixture)

JQ_FILTER = '{cniVersion, name} + (.plugins[] | select(.type == "flannel"))'


def env(tmp_path: Path) -> dict[str, str]:
    return {
        "CNI_COMMAND": "ADD", "CNI_CONTAINERID": "ctr1", "CNI_NETNS": "/var/run/netns/none",
        "CNI_IFNAME": "eth0", "CNI_PATH": str(tmp_path),
    }  # fmt: skip


def jq(conflist: str) -> bytes:
    binary = shutil.which("jq")
    if binary is None:  # fail, never skip: docs/cni.md tells operators to use it
        raise RuntimeError("jq is not installed: apt-get install jq")
    return subprocess.run(
        [binary, "-c", JQ_FILTER], input=conflist.encode(), capture_output=True, check=True,
        timeout=10,
    ).stdout  # fmt: skip


def test_the_installed_conflist_is_named_as_a_conflist(plugin: Path, tmp_path: Path) -> None:
    run = run_plugin(plugin, env(tmp_path), default_conflist().encode())
    reply = assert_error(run, flannel.ERR_INVALID_CONFIG, "network configuration list")
    assert '"plugins" key' in reply["msg"]
    assert "jq" in reply["details"] and "docs/cni.md" in reply["details"]
    assert "subnet.env" not in reply["msg"]


def test_the_docs_jq_line_makes_one_plugin_conf(plugin: Path, tmp_path: Path) -> None:
    conf = jq(default_conflist())
    doc = json.loads(conf)
    assert doc["type"] == "flannel" and doc["name"] == "cbr0" and "plugins" not in doc
    assert flannel.parse_conf(conf).delegate == {"hairpinMode": True, "isDefaultGateway": True}
    # The plugin now gets past the config, to the subnet.env this test does not provide.
    e = env(tmp_path)
    doc["subnetFile"] = str(tmp_path / "no-subnet.env")
    run = run_plugin(plugin, e, json.dumps(doc).encode())
    reply = assert_error(run, flannel.ERR_TRY_AGAIN_LATER)
    assert "no-subnet.env" in reply["msg"]


def test_a_plugin_conf_with_a_plugins_key_is_still_a_plugin_conf() -> None:
    # Only a document without "type" is taken for a conflist.
    conf = {"cniVersion": "1.0.0", "name": "n", "type": "flannel", "plugins": []}
    assert flannel.parse_conf(json.dumps(conf)).name == "n"


@given(
    plugins=st.one_of(st.none(), st.integers(), st.text(max_size=5),
                      st.lists(st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
                               max_size=3)),
    extra=st.dictionaries(st.sampled_from(["cniVersion", "name", "delegate", "ipam"]),
                          st.one_of(st.text(max_size=8), st.integers()), max_size=4),
)  # fmt: skip
def test_any_document_with_plugins_and_no_type_is_refused_as_a_conflist(
    plugins: Any, extra: dict[str, Any]
) -> None:
    doc = {**extra, "plugins": plugins}
    with pytest.raises(flannel.CNIError) as info:
        flannel.parse_conf(json.dumps(doc))
    assert info.value.code == flannel.ERR_INVALID_CONFIG
    assert "network configuration list" in str(info.value.msg)
