"""Benchmark-only part of the rig: the link. A veth pair to a namespace of the clients (the default), or an HTB
class on loopback."""

from __future__ import annotations

import subprocess


class _Link:
    """Set up by a list of commands; ``ok`` says whether all took, else ``error`` names the first that failed
    and what was set up is torn down again."""

    ok = False
    error = ""

    def _apply(self, cmds: list[str]):
        for cmd in cmds:
            r = subprocess.run(cmd.split(), capture_output=True, text=True)
            if r.returncode != 0:
                self.error = f"{cmd}: {r.stderr.strip()}"
                self.__exit__()
                return self
        self.ok = True
        return self

    def __exit__(self, *exc: object) -> None:
        raise NotImplementedError


class LoopbackLink(_Link):
    """Shape what the given local ports send (the CDN's and the registry's replies) with an HTB class on ``lo``:
    one link of ``rate_mbit`` shared by every connection, like a node's NIC. Other loopback traffic is not
    classified and passes unshaped. Needs root and the sch_htb module; ``ok`` says whether it took."""

    def __init__(self, rate_mbit: int, ports: list[int]):
        self.rate_mbit = rate_mbit
        self.ports = ports
        self.ok = False
        self.error = ""

    def __enter__(self) -> LoopbackLink:
        cmds = [
            "tc qdisc add dev lo root handle 1: htb default 0",
            f"tc class add dev lo parent 1: classid 1:1 htb rate {self.rate_mbit}mbit ceil {self.rate_mbit}mbit",
        ]
        cmds += [
            f"tc filter add dev lo protocol ip parent 1: prio 1 u32 match ip sport {p} 0xffff flowid 1:1"
            for p in self.ports
        ]
        return self._apply(cmds)

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["tc", "qdisc", "del", "dev", "lo", "root"], capture_output=True)


class VethLink(_Link):
    """The clients in their own network namespace, joined to this one by a veth pair: the servers (registry, CDN)
    listen on ``server_ip``, the benchmarked commands run with :meth:`prefix` in namespace ``ns`` at
    ``client_ip``. What the servers send is shaped on the host side of the veth (tbf, ``rate_mbit``): one link
    shared by every connection, with a real MTU (1500) instead of loopback's 64 KiB, so the per-packet costs of
    a NIC are in the measurement. Needs root; ``ok`` says whether it took."""

    def __init__(self, rate_mbit: int, ns: str = "pb-cli", net: str = "10.232.0"):
        self.rate_mbit = rate_mbit
        self.ns = ns
        self.server_ip, self.client_ip = f"{net}.1", f"{net}.2"
        self.outer, self.inner = f"{ns}-h"[:15], f"{ns}-n"[:15]
        self.ok = False
        self.error = ""

    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.ns]

    def __enter__(self) -> VethLink:
        self.__exit__()  # leftovers of an interrupted run
        cmds = [
            f"ip netns add {self.ns}",
            f"ip link add {self.outer} type veth peer name {self.inner}",
            f"ip link set {self.inner} netns {self.ns}",
            f"ip addr add {self.server_ip}/30 dev {self.outer}",
            f"ip link set {self.outer} up",
            f"ip netns exec {self.ns} ip addr add {self.client_ip}/30 dev {self.inner}",
            f"ip netns exec {self.ns} ip link set {self.inner} up",
            f"ip netns exec {self.ns} ip link set lo up",
        ]
        if self.rate_mbit:
            burst_kb = max(64, self.rate_mbit * 1000 // 8 // 100)  # 10 ms worth
            cmds.append(
                f"tc qdisc add dev {self.outer} root tbf rate {self.rate_mbit}mbit burst {burst_kb}kb latency 50ms"
            )
        return self._apply(cmds)

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.outer], capture_output=True)
