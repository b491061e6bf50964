"""The installed plugin, exec'd as a runtime execs it, against hostile input: environment
variables of any bytes and length, stdin of any size, nesting, encoding and type, broken
subnet.env and saved confs, missing files, and delegates that misbehave.

Every run must end in the CNI error contract: a non-zero exit, exactly one CNI error object
on stdout with the expected code (never 999, the plugin's last resort for bugs), no traceback
on stderr, and no saved conf or temp file left in the dataDir. DEL of what ADD refuses
succeeds.

The misbehaving delegates are small shell scripts: test doubles, because no real plugin prints
garbage, floods its output or dies on purpose. The real `bridge` + `host-local` are used where
behaviour with a real delegate matters (test_cni_plugin.py). No root needed here: no delegate
here touches the kernel.
"""
# ruff: noqa: F811  (pytest fixtures imported from tests.test_cni_support are parameters)

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cni import flannel
from tests.test_cni_support import plugin, write_subnet_env  # noqa: F401  (fixture)

RUN_TIMEOUT = 30.0
# What may stay in a dataDir after a failed call: the lock file and the delegate version cache
# (plugin-wide, not per attachment). Never a saved conf or a temp file.
PLUGIN_FILES = {flannel.LOCK_NAME, flannel.VERSIONS_CACHE}
CNI_CODES = {1, 2, 3, 4, 5, 6, 7, 11, 50, 51, 100, 101, 102, 103}


@dataclass
class Run:
    rc: int
    stdout: bytes
    stderr: bytes

    def reply(self) -> dict[str, Any]:
        """stdout as exactly one JSON object, in UTF-8."""
        doc = json.loads(self.stdout.decode("utf-8"))
        assert isinstance(doc, dict), self.stdout
        return doc


def run_plugin(
    plugin: Path,
    env: Mapping[str, str | bytes],
    stdin: bytes | int | None = b"",
    timeout: float = RUN_TIMEOUT,
) -> Run:
    """Exec the plugin with exactly `env` (bytes allowed) and `stdin` (bytes, or a file
    descriptor; None: stdin closed)."""
    benv = {
        k.encode() if isinstance(k, str) else k: v.encode() if isinstance(v, str) else v
        for k, v in env.items()
    }
    kwargs: dict[str, Any] = {}
    if isinstance(stdin, bytes):
        kwargs["input"] = stdin
    elif isinstance(stdin, int):
        kwargs["stdin"] = stdin
    else:
        # A closed fd 0: the shell closes it, then execs the plugin.
        return _run(["/bin/sh", "-c", 'exec "$0" <&-', str(plugin)], benv, timeout)
    proc = subprocess.run(
        [str(plugin)], env=benv, capture_output=True, timeout=timeout, check=False, **kwargs
    )
    return Run(proc.returncode, proc.stdout, proc.stderr)


def _run(argv: list[str], env: dict[bytes, bytes], timeout: float) -> Run:
    proc = subprocess.run(argv, env=env, capture_output=True, timeout=timeout, check=False)
    return Run(proc.returncode, proc.stdout, proc.stderr)


def assert_error(run: Run, code: int, words: str = "") -> dict[str, Any]:
    """The CNI error contract: non-zero exit, one error object, that code, no traceback."""
    assert b"Traceback" not in run.stderr, run.stderr.decode(errors="replace")
    reply = run.reply()
    assert run.rc != 0, reply
    assert set(reply) <= {"cniVersion", "code", "msg", "details"}, reply
    assert isinstance(reply["cniVersion"], str) and isinstance(reply["msg"], str)
    assert isinstance(reply.get("details", ""), str)
    assert reply["code"] != flannel.ERR_INTERNAL, reply
    assert reply["code"] == code, reply
    assert words in reply["msg"], reply
    # Outside values are quoted cut, whatever their size; only paths (checked to be at most
    # 4095 characters) are named in full.
    assert len(run.stdout) < 3 * 4096
    return reply


def assert_success(run: Run) -> None:
    assert b"Traceback" not in run.stderr, run.stderr.decode(errors="replace")
    assert (run.rc, run.stdout) == (0, b""), run.stdout


@dataclass
class Site:
    plugin: Path
    root: Path
    bin: Path  # the only CNI_PATH dir: holds the (fake) delegates of a test, nothing else
    subnet_env: Path
    data_dir: Path
    log: Path  # each fake delegate call appends "<CNI_COMMAND>"

    def conf(self, **extra: Any) -> dict[str, Any]:
        conf: dict[str, Any] = {
            "cniVersion": "1.0.0",
            "name": "hostile",
            "type": "flannel",
            "subnetFile": str(self.subnet_env),
            "dataDir": str(self.data_dir),
        }
        conf.update(extra)
        return conf

    def stdin(self, **extra: Any) -> bytes:
        return json.dumps(self.conf(**extra)).encode()

    def env(self, command: str = "ADD", **override: str | bytes) -> dict[str, str | bytes]:
        env: dict[str, str | bytes] = {
            "PATH": "/usr/bin:/bin",
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": "ctr1",
            "CNI_IFNAME": "eth0",
            "CNI_NETNS": "/run/netns/hostile-none",
            "CNI_PATH": str(self.bin),
        }
        env.update(override)
        return env

    def delegate(self, name: str, body: str) -> str:
        """A fake delegate (test double): logs its command, then runs `body` (sh)."""
        script = self.bin / name
        script.write_text(f'#!/bin/sh\necho "$CNI_COMMAND" >> {self.log}\n{body}\n')
        script.chmod(0o755)
        return name

    def calls(self) -> list[str]:
        return self.log.read_text().split() if self.log.exists() else []

    def leftovers(self) -> list[str]:
        """What the dataDir holds beyond the plugin-wide files (saved confs, temp files)."""
        if not self.data_dir.is_dir():
            return []
        return sorted(p.name for p in self.data_dir.iterdir() if p.name not in PLUGIN_FILES)

    def run(
        self,
        command: str = "ADD",
        stdin: bytes | int | None = None,
        env: dict[str, str | bytes] | None = None,
        **conf: Any,
    ) -> Run:
        data = self.stdin(**conf) if stdin is None else stdin
        return run_plugin(self.plugin, env if env is not None else self.env(command), data)


@pytest.fixture
def site(plugin: Path, tmp_path: Path) -> Site:
    (tmp_path / "cni-bin").mkdir()
    return Site(
        plugin=plugin,
        root=tmp_path,
        bin=tmp_path / "cni-bin",
        subnet_env=write_subnet_env(tmp_path / "subnet.env"),
        data_dir=tmp_path / "state" / "flannel",
        log=tmp_path / "delegate.log",
    )


# -- the environment -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ({"CNI_IFNAME": b"\xff\xfe"}, "not valid UTF-8"),
        ({"CNI_IFNAME": b"eth\xc3"}, "not valid UTF-8"),
        ({"CNI_IFNAME": "e" * 100_000}, "longer than 15 bytes"),
        (
            {"CNI_IFNAME": "\u00e9\u00e9\u00e9\u00e9\u00e9\u00e9\u00e9\u00e98"},
            "longer than 15 bytes",
        ),
        ({"CNI_IFNAME": "eth\u200b0\u0085"}, "whitespace or a control character"),
        ({"CNI_CONTAINERID": "a" * 300}, "longer than 239 characters"),
        ({"CNI_CONTAINERID": "../../etc/cron.d/x"}, "invalid CNI_CONTAINERID"),
        ({"CNI_CONTAINERID": b"ctr\xff"}, "invalid CNI_CONTAINERID"),
        ({"CNI_CONTAINERID": "x" * 100_000}, "invalid CNI_CONTAINERID"),
        ({"CNI_COMMAND": b"\xffADD"}, "invalid CNI_COMMAND"),
        ({"CNI_COMMAND": "A" * 100_000}, "invalid CNI_COMMAND"),
        ({"CNI_ARGS": "K=V;" * 10_000 + "oops"}, "invalid CNI_ARGS item 'oops'"),
        ({"CNI_ARGS": "=V"}, "invalid CNI_ARGS item '=V'"),
        ({"CNI_ARGS": b"K=\xff;\xfe"}, "invalid CNI_ARGS item"),
        ({"CNI_NETNS": ""}, "CNI_NETNS is not set"),
        ({"CNI_PATH": ":" * 100_000}, "CNI_PATH is not set"),
    ],
)
def test_hostile_environment_is_code_4_and_del_of_it_succeeds(
    site: Site, override: dict[str, str | bytes], words: str
) -> None:
    assert_error(site.run(env=site.env("ADD", **override)), 4, words)
    assert not site.data_dir.exists()
    if "CNI_COMMAND" in override:
        return
    # DEL with the same environment: whatever ADD refused was never saved, so DEL succeeds,
    # touching no file (not even the lock) when the attachment itself is unnameable.
    site.data_dir.mkdir(parents=True)
    assert_success(site.run(env=site.env("DEL", **override)))
    if "CNI_IFNAME" in override or "CNI_CONTAINERID" in override:
        assert list(site.data_dir.iterdir()) == []


def test_a_long_container_id_is_added_deleted_by_name_length(site: Site) -> None:
    """239 characters is the longest ID whose saved conf name fits 255 bytes with any ifname."""
    cid = "c" * 239
    name = site.delegate("fake", "printf '%s' '{\"cniVersion\":\"1.0.0\"}'")
    ifname = "e" * 15
    env = site.env("ADD", CNI_CONTAINERID=cid, CNI_IFNAME=ifname)
    run = site.run(env=env, delegate={"type": name})
    assert run.rc == 0 and run.reply() == {"cniVersion": "1.0.0"}
    assert site.leftovers() == [f"{cid}-{ifname}"]
    assert_success(site.run(env=site.env("DEL", CNI_CONTAINERID=cid, CNI_IFNAME=ifname)))
    assert site.leftovers() == [] and site.calls() == ["ADD", "DEL"]


def test_no_command_prints_a_hint_and_code_4(site: Site) -> None:
    env = site.env()
    del env["CNI_COMMAND"]
    run = site.run(env=env)
    assert_error(run, 4, "invalid CNI_COMMAND ''")
    assert b"a CNI plugin" in run.stderr


# -- stdin ---------------------------------------------------------------------------------------


def nested(depth: int) -> bytes:
    return b'{"cniVersion":"1.0.0","name":"n","runtimeConfig":' + b"[" * depth + b"]" * depth + b"}"


@pytest.mark.parametrize(
    ("stdin", "code", "words"),
    [
        (b"", 6, "cannot decode"),
        (b" " * (flannel.MAX_STDIN + 1), 6, "larger than 1048576 bytes"),
        (b"\xff\xfe{}", 6, "cannot decode"),
        ('{"cniVersion":"1.0.0","name":"n"}'.encode("utf-16"), 6, "cannot decode"),
        (b'\xef\xbb\xbf{"cniVersion":"1.0.0","name":"n"}', 6, "cannot decode"),
        (b"[" * 1500 + b"]" * 1500, 6, "nested deeper than 64"),
        (b"[" * 200_000, 6, "nested deeper than 64"),
        (nested(63), 11, "does not exist"),  # 64 levels with the conf object: accepted
        (nested(64), 6, "nested deeper than 64"),
        (nested(2000), 6, "nested deeper than 64"),
        (b"[]", 6, "must be a JSON object"),
        (b'"x"', 6, "must be a JSON object"),
        (b"null", 6, "must be a JSON object"),
        (b'{"cniVersion":"1.0.0","name":"n","x":1e400}', 6, "out of range"),
        (b'{"cniVersion":"1.0.0","name":"n","x":NaN}', 6, "cannot decode"),
        (b'{"cniVersion":"1.0.0","name":"n","x":' + b"9" * 5000 + b"}", 6, "cannot decode"),
        (b'{"cniVersion":"1.0.0","name":"n"} {}', 6, "extra data"),
        (b'{"cniVersion":"9.9.9","name":"n"}', 1, "incompatible CNI version '9.9.9'"),
        (b'{"cniVersion":["1.0.0"],"name":"n"}', 1, "incompatible CNI version"),
        (b'{"cniVersion":"1.0.0","name":"a b"}', 7, "invalid network name"),
        (b'{"cniVersion":"1.0.0","name":"n","dataDir":"/x\\u0000y"}', 7, "invalid dataDir"),
        (b'{"cniVersion":"1.0.0","name":"n","subnetFile":"/' + b"a" * 5000 + b'"}', 7, ""),
        (b'{"cniVersion":"1.0.0","name":"n","delegate":{"type":"../../bin/sh"}}', 7, ""),
    ],
)
def test_hostile_stdin_is_a_cni_error(site: Site, stdin: bytes, code: int, words: str) -> None:
    if code == 11:
        stdin = stdin.replace(b'"name":"n"', f'"name":"n","subnetFile":"{site.root}/no"'.encode())
    assert_error(site.run(stdin=stdin), code, words)
    assert not site.data_dir.exists()


def test_stdin_from_dev_zero_or_closed(site: Site) -> None:
    with open("/dev/zero", "rb") as zero:
        assert_error(site.run(stdin=zero.fileno()), 6, "larger than")
    # (A directory as stdin is refused by the interpreter itself before any plugin code runs:
    # "Fatal Python error: init_sys_streams: <stdin> is a directory", exit 1, no JSON. No
    # runtime does that; it is the one input outside the plugin's reach, see docs/cni.md.)
    assert_error(run_plugin(site.plugin, site.env(), None), 5, "Bad file descriptor")


def test_version_always_answers(site: Site) -> None:
    for stdin in (b"", b"\xff", b"[" * 5000, b" " * (flannel.MAX_STDIN + 10), nested(100)):
        run = site.run(env=site.env("VERSION"), stdin=stdin)
        assert run.rc == 0 and run.reply()["cniVersion"] == flannel.LATEST_VERSION
    run = site.run(env=site.env("VERSION"), stdin=b'{"cniVersion":"' + b"9" * 10_000 + b'"}')
    assert run.rc == 0 and len(run.reply()["cniVersion"]) == 64


# -- files: subnet.env, dataDir, saved confs -----------------------------------------------------


def test_hostile_subnet_env_files(site: Site) -> None:
    cases: list[tuple[str, int, str]] = []

    def case(name: str, code: int, words: str) -> Path:
        cases.append((name, code, words))
        return site.root / name

    os.mkfifo(case("fifo.env", 5, "not a regular file"))  # no writer: must not hang
    case("dir.env", 5, "").mkdir()
    case("huge.env", 100, "larger than 65536 bytes").write_bytes(b"#" * 70_000)
    case("binary.env", 100, "not UTF-8").write_bytes(b"FLANNEL_MTU=\xff\n")
    case("nul.env", 100, "").write_bytes(site.subnet_env.read_bytes().replace(b"=1400", b"=14\0"))
    digits = site.subnet_env.read_text().replace("=1400", "=" + "1" * 5000)
    case("digits.env", 100, "FLANNEL_MTU: '1111").write_text(digits)
    prefix = site.subnet_env.read_text().replace("/24", "/" + "2" * 5000)
    case("prefix.env", 100, "bad prefix length").write_text(prefix)
    case("nokeys.env", 100, "missing FLANNEL_NETWORK").write_text("# only a comment\n")
    case("loop.env", 5, "").symlink_to(site.root / "loop.env")
    cases.append(("subnet.env/below-a-file", 5, ""))
    cases.append(("missing.env", 11, "does not exist"))
    for name, code, words in cases:
        assert_error(site.run(subnetFile=str(site.root / name)), code, words)
    assert_error(site.run(subnetFile="/dev/zero"), 5, "not a regular file")
    assert not site.data_dir.exists()


def test_a_data_dir_that_cannot_be_made_or_used(site: Site) -> None:
    name = site.delegate("fake", "printf '{}'")
    blocker = site.root / "a-file"
    blocker.write_text("x")
    for data_dir, words in [
        (blocker, "cannot create dataDir"),
        (blocker / "below", "cannot create dataDir"),
        ("/proc/self/no-such-dir/flannel", "cannot create dataDir"),
    ]:
        run = site.run(dataDir=str(data_dir), delegate={"type": name})
        assert_error(run, 5, words)
        assert_success(site.run("DEL", dataDir=str(data_dir)))  # nothing can be saved there
    lock_dir = site.root / "lockdir"
    (lock_dir / flannel.LOCK_NAME).mkdir(parents=True)
    assert_error(site.run(dataDir=str(lock_dir), delegate={"type": name}), 5, "cannot open")
    # 2000 missing levels below a dir where nothing can be made: make_dirs walks up 2000
    # levels (a loop; the recursion it replaced died with RecursionError, code 999).
    deep = "/proc/self/x" + "/d" * 2000
    assert_error(site.run(dataDir=deep, delegate={"type": name}), 5, "cannot create dataDir")
    assert site.calls() == []


@pytest.mark.parametrize(
    ("content", "code", "words"),
    [
        (b"not json", 6, "is not JSON"),
        (b"\xff\xfe", 6, "is not JSON"),
        (b"[" * 3000 + b"]" * 3000, 6, "nested deeper"),
        (b"[]", 6, "has no plugin type"),
        (b'{"type": 7}', 6, "has no plugin type"),
        (b'{"type": "../../../bin/sh"}', 6, "names no plugin"),
        (b'{"type": "fake", "x": "' + b"a" * (flannel.MAX_SAVED_CONF + 1) + b'"}', 6, "larger"),
        (None, 5, "not a regular file"),  # a FIFO: must not hang
    ],
)
def test_hostile_saved_conf_on_del(
    site: Site, content: bytes | None, code: int, words: str
) -> None:
    site.delegate("fake", "exit 0")
    site.data_dir.mkdir(parents=True)
    saved = site.data_dir / "ctr1-eth0"
    if content is None:
        os.mkfifo(saved)
    else:
        saved.write_bytes(content)
    assert_error(site.run("DEL"), code, words)
    assert site.calls() == []  # nothing named by a bad file is ever run


def test_gc_survives_hostile_saved_confs(site: Site) -> None:
    name = site.delegate("fake", "exit 0")
    site.data_dir.mkdir(parents=True)
    files = {
        "a-eth0": {"type": name, flannel.ATTACHMENT_KEY: ["not", "an", "object"]},
        "b-eth0": {"type": name, flannel.ATTACHMENT_KEY: {"containerID": 7, "ifname": None}},
        "c-eth0": {"type": name, flannel.ATTACHMENT_KEY: "x"},
    }
    for file, doc in files.items():
        (site.data_dir / file).write_text(json.dumps(doc))
    (site.data_dir / "d-eth0").write_bytes(b"[" * 5000)
    (site.data_dir / ".tmp-x-eth0.123").write_text("{}")  # a crashed ADD's temp file
    run = site.run(
        "GC",
        **{"cniVersion": "1.1.0", flannel.VALID_ATTACHMENTS_KEY: [], "delegate": {"type": name}},
    )
    reply = assert_error(run, 102, "GC could not release 1 attachment(s)")
    assert "d-eth0" in reply["details"]
    assert site.leftovers() == ["d-eth0"]  # the rest released (DEL run) and removed
    assert site.calls().count("DEL") == 3


# -- delegates that misbehave (test doubles) and failed ADDs -------------------------------------


def test_a_missing_delegate_leaves_nothing_not_even_the_data_dir(site: Site) -> None:
    assert_error(site.run(delegate={"type": "nosuchplugin"}), 101, "'nosuchplugin'")
    assert not site.data_dir.exists()
    site.data_dir.mkdir(parents=True)
    assert_error(site.run(delegate={"type": "nosuchplugin"}), 101, "'nosuchplugin'")
    assert list(site.data_dir.iterdir()) == []
    # Not executable, or a directory: not a plugin either.
    (site.bin / "noexec").write_text("#!/bin/sh\nexit 0\n")
    (site.bin / "adir").mkdir()
    for name in ("noexec", "adir"):
        assert_error(site.run(delegate={"type": name}), 101, repr(name))
    assert list(site.data_dir.iterdir()) == []


@pytest.mark.parametrize(
    ("body", "words"),
    [
        # exit 0, but no CNI result: the ADD may have done its work, so its DEL is run.
        ("printf 'not json'", "printed no JSON result"),
        ("printf '\\377\\376'", "printed no JSON result"),
        ("printf '[1]'", "bad result"),
        ("head -c 3000 /dev/zero | tr '\\0' '['", "printed no JSON result"),
        ("head -c 2000000 /dev/zero", "printed more than 1048576 bytes"),
        # a failure without a CNI error: the delegate's own words are not lost.
        ("echo boom; exit 3", "failed with exit status 3"),
        ('printf \'{"code":"7","msg":"x"}\'; exit 1', "failed with exit status 1"),
        ('printf \'{"code":true,"msg":"x"}\'; exit 1', "failed with exit status 1"),
        ('printf \'{"code":0,"msg":"x"}\'; exit 1', "failed with exit status 1"),
        ("kill -9 $$", "failed with exit status -9"),
    ],
)
def test_a_failed_add_runs_the_delegates_del_and_leaves_nothing(
    site: Site, body: str, words: str
) -> None:
    """The delegate ran, so it may have half-succeeded: its DEL is run (as flannel does) and
    the saved conf is removed."""
    name = site.delegate("fake", f'[ "$CNI_COMMAND" = DEL ] && exit 0\ncat >/dev/null\n{body}')
    assert_error(site.run(delegate={"type": name}), 102, words)
    assert site.calls() == ["ADD", "DEL"]
    assert site.leftovers() == []


def test_a_delegates_own_cni_error_is_passed_on_and_still_undone(site: Site) -> None:
    error = b'{"cniVersion":"1.0.0","code":7,"msg":"bad conf","details":"from the delegate"}'
    name = site.delegate(
        "fake", f"[ \"$CNI_COMMAND\" = DEL ] && exit 0\nprintf '%s' '{error.decode()}'\nexit 1"
    )
    run = site.run(delegate={"type": name})
    assert run.rc == 1 and run.stdout == error and b"Traceback" not in run.stderr
    assert site.calls() == ["ADD", "DEL"] and site.leftovers() == []


def test_a_delegate_whose_del_fails_too_still_leaves_no_saved_conf(site: Site) -> None:
    name = site.delegate("fake", "echo 'half done'; exit 1")
    reply = assert_error(site.run(delegate={"type": name}), 102, "failed with exit status 1")
    assert "DEL after the failed ADD failed too" in reply["details"]
    assert site.calls() == ["ADD", "DEL"] and site.leftovers() == []


def test_a_delegate_that_cannot_start_is_not_asked_to_del(site: Site) -> None:
    script = site.bin / "badinterp"
    script.write_text("#!/nonexistent/interpreter\n")
    script.chmod(0o755)
    assert_error(site.run(delegate={"type": "badinterp"}), 102, "cannot run")
    assert site.leftovers() == [] and site.calls() == []


def test_a_delegate_that_reads_no_stdin_cannot_block_a_large_conf(site: Site) -> None:
    """A conf far larger than a pipe buffer, and a delegate that never reads it: fed in the
    same poll loop that reads the output, so the plugin does not block on the write."""
    name = site.delegate("fake", '[ "$CNI_COMMAND" = DEL ] && exit 0\necho oops; exit 1')
    big = {"blob": "x" * 900_000}
    run = site.run(delegate={"type": name}, runtimeConfig=big)
    assert_error(run, 102, "failed with exit status 1")
    assert site.leftovers() == []


def test_a_lone_surrogate_in_the_conf_reaches_the_delegate_as_u_fffd(site: Site) -> None:
    seen = site.root / "seen.json"
    name = site.delegate("fake", f"cat > {seen}\nprintf '%s' '{{\"cniVersion\":\"1.0.0\"}}'")
    stdin = site.stdin(delegate={"type": name}).replace(b'"fake"}', b'"fake","x":"\\ud800"}')
    run = site.run(stdin=stdin)
    assert run.rc == 0, run.stdout
    assert json.loads(seen.read_text(encoding="utf-8"))["x"] == "\ufffd"


# -- any environment and any stdin (hypothesis, through the real process) ------------------------

ENV_KEYS = ("CNI_COMMAND", "CNI_CONTAINERID", "CNI_IFNAME", "CNI_NETNS", "CNI_ARGS", "CNI_PATH")
env_values = st.one_of(
    st.binary(max_size=40).filter(lambda b: b"\0" not in b),
    st.sampled_from([b"ADD", b"DEL", b"CHECK", b"VERSION", b"STATUS", b"GC", b"ctr1", b"eth0"]),
    st.text(max_size=30).map(lambda t: t.encode("utf-8", "surrogatepass").replace(b"\0", b"")),
)
stdins = st.one_of(
    st.sampled_from([b"@site", b"@site-gc"]),  # a valid conf naming the test's own files
    st.binary(max_size=200),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
        max_leaves=20,
    ).map(lambda doc: json.dumps(doc).encode()),
)


@settings(
    max_examples=max(10, settings.default.max_examples // 5),
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(st.dictionaries(st.sampled_from(ENV_KEYS), env_values), stdins)
def test_any_environment_and_stdin_end_in_the_contract(
    site: Site, env: dict[str, bytes], stdin: bytes
) -> None:
    """Random bytes in every CNI_* variable, random stdin: the process answers with a result
    or CNI error JSON, never a traceback, and never saves anything for a failed call.
    (No delegate can be found, so no ADD can succeed, and nothing may appear in the dataDir.)"""
    if stdin == b"@site":
        stdin = site.stdin()
    elif stdin == b"@site-gc":
        stdin = site.stdin(cniVersion="1.1.0")
    run = run_plugin(site.plugin, {"PATH": "/usr/bin:/bin", **env}, stdin)
    assert b"Traceback" not in run.stderr
    if run.rc == 0:
        assert run.stdout == b"" or "supportedVersions" in run.reply()
    else:
        reply = run.reply()
        assert reply["code"] in CNI_CODES, reply
    assert not site.data_dir.exists()


@pytest.mark.parametrize(
    "cache",
    [
        None,  # a FIFO: must not hang
        b"garbage",
        b"[" * 5000,
        b"[1, 2]",
        b'{"%s": "not an object"}',
        b'{"%s": {"stat": "x", "versions": [1, null, {}]}}',
        b'{"%s": {"stat": [1, 2, 3], "versions": "1.0.0"}}',
        b"\xff" * 100,
    ],
)
def test_a_hostile_delegate_version_cache_is_ignored(site: Site, cache: bytes | None) -> None:
    """.delegate-versions is a cache: whatever is in it, ADD and DEL work as without it."""
    name = site.delegate("fake", "printf '%s' '{\"cniVersion\":\"1.0.0\"}'")
    site.data_dir.mkdir(parents=True)
    path = site.data_dir / flannel.VERSIONS_CACHE
    if cache is None:
        os.mkfifo(path)
    else:
        path.write_bytes(cache.replace(b"%s", str(site.bin / name).encode()))
    run = site.run(delegate={"type": name})
    assert run.rc == 0 and run.reply() == {"cniVersion": "1.0.0"}, run.stdout
    assert_success(site.run("DEL", delegate={"type": name}))
    assert site.calls() == ["ADD", "DEL"] and site.leftovers() == []


def test_check_of_a_saved_conf_with_a_garbled_ipam_is_a_mismatch(site: Site) -> None:
    name = site.delegate("fake", "exit 0")
    site.data_dir.mkdir(parents=True)
    (site.data_dir / "ctr1-eth0").write_text(json.dumps({"type": name, "ipam": "garbled"}))
    run = site.run("CHECK", cniVersion="1.0.0")
    assert_error(run, flannel.ERR_CHECK_MISMATCH, "was attached to ranges None")
    assert site.calls() == []
