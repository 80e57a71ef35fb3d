"""Two hosts on one machine for tests: two network namespaces of the test's own, linked by a veth pair, each with its
own address on a private /30 and its own loopback. A process started in one (`Host.argv`) reaches the other only by
that address, as a process on another machine would: no route, no shared loopback. The filesystem and the process
table stay shared (as a cluster's shared storage would be, and so that the test can signal what it started).

`two_hosts()` creates them and removes them (and every process still in them) at the end. Where they cannot be made
(not root, no `ip`, a kernel or container without network namespaces) the caller skips with the reason printed.
Traffic goes only to the addresses given here.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass


class NoNamespaces(RuntimeError):
    """Network namespaces cannot be made here; the message says why."""


@dataclass(frozen=True)
class Host:
    namespace: str
    address: str  # its address on the link; the other host reaches it there
    interface: str  # its end of the veth pair (GLOO_SOCKET_IFNAME)

    def argv(self, command: Sequence[str]) -> list[str]:
        """`command` run in this host's network namespace."""
        return ["ip", "netns", "exec", self.namespace, *command]

    def run(self, command: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(command), **kwargs)

    def popen(self, command: Sequence[str], **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.argv(command), **kwargs)

    def pids(self) -> list[int]:
        listed = subprocess.run(["ip", "netns", "pids", self.namespace], capture_output=True, text=True, timeout=30)
        return [int(pid) for pid in listed.stdout.split()]


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise NoNamespaces(f"`ip {' '.join(args)}` failed: {(done.stderr or done.stdout).strip()}")


@contextlib.contextmanager
def two_hosts(prefix: str = "s1") -> Iterator[tuple[Host, Host]]:
    """Two linked namespaces `{prefix}a{pid}` (10.213.x.1) and `{prefix}b{pid}` (10.213.x.2); removed at the end,
    after every process left in them is killed. Raises NoNamespaces when they cannot be made."""
    if shutil.which("ip") is None:
        raise NoNamespaces("the `ip` command (iproute2) is not installed")
    if os.geteuid() != 0:
        raise NoNamespaces("network namespaces need root (CAP_NET_ADMIN); this test runs as an ordinary user")
    tag = f"{os.getpid() % 100000}"
    subnet = 4 * (os.getpid() % 60)  # a /30 of 10.213.<x>.0/24 per test process
    names = (f"{prefix}a{tag}", f"{prefix}b{tag}")
    links = (f"{prefix}va{tag}", f"{prefix}vb{tag}")
    hosts = tuple(Host(name, f"10.213.{subnet // 256}.{subnet % 256 + i + 1}", link)
                  for i, (name, link) in enumerate(zip(names, links, strict=True)))
    made: list[str] = []
    try:
        for name in names:
            _ip("netns", "add", name)
            made.append(name)
        _ip("link", "add", links[0], "netns", names[0], "type", "veth", "peer", "name", links[1], "netns", names[1])
        for host in hosts:
            _ip("-n", host.namespace, "addr", "add", f"{host.address}/30", "dev", host.interface)
            _ip("-n", host.namespace, "link", "set", host.interface, "up")
            _ip("-n", host.namespace, "link", "set", "lo", "up")
        yield hosts  # type: ignore[misc]
    finally:
        for name in made:
            _kill_all_in(name)
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


def _kill_all_in(namespace: str) -> None:
    for _ in range(50):
        listed = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True, timeout=30)
        pids = [int(pid) for pid in listed.stdout.split()]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


def reachable(host: Host, url: str, timeout: float = 5) -> bool:
    """Whether `url` answers from `host` (any HTTP status counts: something listens there)."""
    script = ("import sys, urllib.request, urllib.error\n"
              "try:\n urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2]))\n"
              "except urllib.error.HTTPError:\n pass\n")
    import sys

    done = host.run([sys.executable, "-c", script, url, str(timeout)], capture_output=True, timeout=timeout + 30)
    return done.returncode == 0
