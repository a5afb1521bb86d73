"""Benchmark-only parts of the rig: a link limit on loopback, and a private containerd for `ctr`."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path


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


class Containerd:
    """containerd with its own root, state and socket under ``workdir`` (CRI plugin disabled)."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.socket = workdir / "containerd.sock"
        self.proc: subprocess.Popen | None = None

    @staticmethod
    def available() -> bool:
        return bool(shutil.which("containerd") and shutil.which("ctr"))

    def __enter__(self) -> Containerd:
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = self.workdir / "config.toml"
        cfg.write_text(
            "version = 2\n"
            f'root = "{self.workdir}/root"\nstate = "{self.workdir}/state"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            f'[grpc]\n  address = "{self.socket}"\n'
            f'[ttrpc]\n  address = "{self.socket}.ttrpc"\n'
        )
        self.log = open(self.workdir / "containerd.log", "wb")
        self.proc = subprocess.Popen(
            ["containerd", "--config", str(cfg)], stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + 20
        while subprocess.run(self.ctr("version"), capture_output=True).returncode != 0:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"containerd did not start; see {self.workdir / 'containerd.log'}")
            time.sleep(0.1)
        return self

    def ctr(self, *args: str) -> list[str]:
        return ["ctr", "--address", str(self.socket), *args]

    def cpu_seconds(self) -> float:
        """User + system CPU time the daemon has used so far."""
        assert self.proc
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        import os

        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def __exit__(self, *exc: object) -> None:
        if self.proc:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()
