"""Benchmark-only part of the rig: a link limit on loopback."""

from __future__ import annotations

import subprocess


class LoopbackLink:
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
        for cmd in cmds:
            r = subprocess.run(cmd.split(), capture_output=True, text=True)
            if r.returncode != 0:
                self.error = f"{cmd}: {r.stderr.strip()}"
                self.__exit__()
                return self
        self.ok = True
        return self

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["tc", "qdisc", "del", "dev", "lo", "root"], capture_output=True)
