"""Offline means offline (issue 21): a training run with W&B offline and the Hugging Face hub offline looks up
no host name and opens no Internet socket, in its own process or in any it starts (W&B's service).

Two nets: a ``sitecustomize`` on ``PYTHONPATH`` (inherited by every Python process the run starts) makes the
resolver and Internet connects raise and records the call; and, where ``strace`` is installed, the whole
process tree's system calls are traced, which also covers W&B's compiled service (``wandb-core``) and system
monitor. Allowed, because they are local inter-process or kernel calls, not network traffic: Unix sockets
(the client talks to its service through one), netlink (the system monitor reads the network interfaces'
counters from the kernel), and urllib3's probe that binds a socket to ``::1`` (loopback, port 0) to learn
whether IPv6 exists. A lookup of ``localhost`` or a loopback address would be local IPC too and is allowed
explicitly; none happens today.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.scripts import ROOT

LOOPBACK = ("localhost", "127.0.0.1", "::1", "ip6-localhost")

SITECUSTOMIZE = r'''
import os, socket, traceback

_LOG = os.environ["FLUXGUIDE_NET_LOG"]
_LOOPBACK = {LOOPBACK!r}


def _record(what):
    with open(_LOG, "a") as f:
        f.write(f"{{os.getpid()}} {{what}}\n" + "".join(traceback.format_stack()[-8:-2]) + "\n")


def _guard(name):
    original = getattr(socket, name)

    def guarded(*args, **kwargs):
        host = args[0] if args else kwargs.get("host")
        if isinstance(host, tuple):  # create_connection((host, port))
            host = host[0]
        if isinstance(host, bytes):
            host = host.decode()
        if host in _LOOPBACK:  # the W&B service's local socket would be IPC, not network
            return original(*args, **kwargs)
        _record(f"socket.{{name}}{{args!r:.120}}")
        raise OSError(f"network access in an offline run: socket.{{name}}{{args!r:.120}}")

    setattr(socket, name, guarded)


for _name in ("getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr", "getnameinfo", "getfqdn",
              "create_connection"):
    _guard(_name)

_connect = socket.socket.connect


def _guarded_connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in _LOOPBACK:
        _record(f"socket.connect{{address!r}}")
        raise OSError(f"network access in an offline run: connect {{address!r}}")
    return _connect(self, address)


socket.socket.connect = _guarded_connect
'''.format(LOOPBACK=LOOPBACK)


def offline_env(tmp_path: Path) -> dict[str, str]:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update({"PYTHONPATH": os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")])),
                "FLUXGUIDE_NET_LOG": str(tmp_path / "network.log"), "WANDB_MODE": "offline",
                "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    return env


def one_update(tmp_path: Path) -> list[str]:
    return [str(ROOT / "experiments" / "train_reward_gradient.py"), "--backbone", "shapes", "--num-steps", "2",
            "--batch-size", "2", "--policy", "mlp", "--hidden-dim", "8", "--num-layers", "1",
            "--eval-num-prompts", "2", "--eval-samples-per-prompt", "1", "--grid-prompts", "2",
            "--total-updates", "1", "--run-dir", str(tmp_path / "run")]


def network_syscalls(trace: str) -> list[str]:
    """The traced system calls that would reach the network: a resolver configuration read (a DNS lookup), or
    an Internet socket connected or sent to anything but loopback."""
    bad = []
    for line in trace.splitlines():
        if re.search(r"open(at)?\(.*\"/etc/(resolv\.conf|hosts)\"", line):
            bad.append(line)
        elif re.search(r"(connect|sendto|sendmsg)\(.*sa_family=AF_INET6?\b", line) and not re.search(
                r"127\.0\.0\.1|\"::1\"", line):
            bad.append(line)
    return bad


def test_an_offline_training_run_makes_no_network_call(tmp_path: Path) -> None:
    env = offline_env(tmp_path)
    strace = shutil.which("strace")
    trace = tmp_path / "trace"
    prefix = [strace, "-f", "-qq", "-e", "trace=network,openat,execve", "-e", "signal=none", "-o", str(trace)] \
        if strace else []
    proc = subprocess.run([*prefix, sys.executable, *one_update(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "guidance.safetensors").is_file()
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*")), "the W&B run was not written offline"
    log = tmp_path / "network.log"
    assert not log.exists(), f"network calls from Python:\n{log.read_text()}"
    if strace is None:
        pytest.skip("strace is not installed: W&B's compiled service was not traced (the Python processes were)")
    text = trace.read_text()
    assert network_syscalls(text) == []
    # W&B's service was started without its error reporting (Sentry), the one part that would use the network.
    services = [line for line in text.splitlines() if "execve(" in line and "wandb-core" in line
                and "ENOENT" not in line]
    assert services, "W&B's service process was not seen in the trace"
    assert all("--no-observability" in line for line in services), services


def test_the_guard_itself_catches_a_lookup(tmp_path: Path) -> None:
    """The sitecustomize net records and refuses a real lookup (and lets localhost through)."""
    env = offline_env(tmp_path)
    code = ("import socket; socket.getaddrinfo('localhost', 80)\n"
            "try:\n    socket.getaddrinfo('example.com', 443)\nexcept OSError as e:\n    print('refused', e)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert "refused" in out
    assert "example.com" in (tmp_path / "network.log").read_text()
    assert "localhost" not in (tmp_path / "network.log").read_text()
