"""Multi-node training between hosts that share nothing: two hosts (network namespaces on this machine, joined by a
bridge), each with its own runs folder, train with torchrun's c10d rendezvous (gloo) on WebDataset shards served by
nginx on a third host; one host's process is killed mid-epoch, both resume, and the final weights equal those of
`--nproc 2` on one host. Needs root (`ip netns`) and nginx (.ci/run installs Debian's)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdforge.train.share import pack, unpack

from .test_streaming import photos  # noqa: F401 - the photos fixture

NET = "10.213.0"
HOSTS = {"a": f"{NET}.1", "b": f"{NET}.2", "c": f"{NET}.3"}  # two trainers and the data server
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


@pytest.fixture(scope="module")
def hosts():
    """Namespaces kdf<pid>-a/-b/-c, each with one veth end (its address above) on a bridge in kdf<pid>-sw."""
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("network namespaces need root and iproute2")
    tag = f"kdf{os.getpid() % 100000}"
    names = {host: f"{tag}-{host}" for host in (*HOSTS, "sw")}
    try:
        for name in names.values():
            sh("ip", "netns", "add", name)
            sh("ip", "-n", name, "link", "set", "lo", "up")
        sh("ip", "-n", names["sw"], "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", names["sw"], "link", "set", "br0", "up")
        for host, address in HOSTS.items():
            inside, outside = f"v{host}", f"{tag}{host}"
            sh("ip", "link", "add", inside, "netns", names[host], "type", "veth", "peer", "name", outside,
               "netns", names["sw"])
            sh("ip", "-n", names["sw"], "link", "set", outside, "master", "br0", "up")
            sh("ip", "-n", names[host], "addr", "add", f"{address}/24", "dev", inside)
            sh("ip", "-n", names[host], "link", "set", inside, "up")
        yield names
    finally:
        for name in names.values():
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.fixture(scope="module")
def data_server(hosts, photos, tmp_path_factory):  # noqa: F811 - the fixture imported above
    """nginx on host c serving the photos' shards: their URL."""
    if not os.access(NGINX, os.X_OK):
        pytest.skip("nginx is not installed (.ci/run installs Debian's)")
    work = tmp_path_factory.mktemp("nginx-c")
    temp = "".join(f"{kind}_temp_path {work}/{kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi",
                                                                    "scgi"))
    (work / "nginx.conf").write_text(
        f"daemon off;\npid {work}/nginx.pid;\nerror_log {work}/error.log;\nworker_processes 1;\nuser root;\n"
        f"events {{}}\nhttp {{\n access_log off;\n {temp} server {{ listen {HOSTS['c']}:8080; root {photos}; "
        f"location / {{ }} }}\n}}\n")
    server = subprocess.Popen(["ip", "netns", "exec", hosts["c"], NGINX, "-c", str(work / "nginx.conf"), "-p",
                               str(work)], stderr=subprocess.PIPE)
    url = f"http://{HOSTS['c']}:8080/shards"
    for _ in range(50):
        if subprocess.run(["ip", "netns", "exec", hosts["a"], sys.executable, "-c",
                           f"import urllib.request; urllib.request.urlopen('{url}/index.json', timeout=1)"],
                          capture_output=True).returncode == 0:
            break
        time.sleep(0.1)
    yield url
    server.terminate()
    server.wait(10)


def recipe_file(tmp_path: Path, url: str) -> Path:
    path = tmp_path / "nodes.toml"
    path.write_text(
        f'name = "nodes"\n[data]\ndataset = "webdataset"\nroot = "{url}"\nimage_size = 32\nin_memory = false\n'
        'workers = 1\naugment = { scale = [0.5, 1.0] }\n[runtime]\ndevice = "cpu"\nthreads = 1\n'
        '[train]\nepochs = 10\nbatch_size = 8\nlr = 3e-3\nlog_every = 5\ncheckpoint_every = 3\n'
        '[teacher]\nmodel = "test_convnext"\ninput_size = 32\n[student]\nmodel = "test_convnext"\ninput_size = 32\n')
    return path


def on_host(namespace: str, host: str, command: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "GLOO_SOCKET_IFNAME": f"v{host}"}
    return subprocess.Popen(["ip", "netns", "exec", namespace, *command], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)


def node_command(recipe: Path, runs: Path, host: str, port: int, resume: bool) -> list[str]:
    """kdforge's own torchrun line (`kdforge teacher --nnodes 2 --rdzv-endpoint ...`) plus torchrun's --local-addr
    and is_host: these hosts' shared hostname resolves to neither of their addresses, so torchrun could tell
    neither its own address nor that host a holds the rendezvous endpoint."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--rdzv-backend=c10d",
            f"--rdzv-endpoint={HOSTS['a']}:{port}", "--rdzv-id=nodes", f"--local-addr={HOSTS[host]}",
            f"--rdzv-conf=is_host={'true' if host == 'a' else 'false'}",
            "--nproc-per-node=1", "-m", "kdforge", "teacher", str(recipe), "--runs-dir", str(runs),
            *(["--resume"] if resume else [])]


@pytest.mark.heavy
def test_two_hosts_sharing_nothing_resume_a_killed_run_to_the_weights_of_one_host(hosts, data_server, tmp_path):
    recipe = recipe_file(tmp_path, data_server)
    # the reference: --nproc 2 on host a alone, uninterrupted, reading the same shards
    reference = on_host(hosts["a"], "a", [sys.executable, "-m", "kdforge", "teacher", str(recipe), "--runs-dir",
                                          str(tmp_path / "one-host"), "--nproc", "2"])
    _, stderr = reference.communicate(timeout=600)
    assert reference.returncode == 0, stderr[-3000:]
    expected = load_file(str(tmp_path / "one-host" / "nodes" / "teacher" / "last" / "model.safetensors"))

    runs = {"a": tmp_path / "host-a", "b": tmp_path / "host-b"}  # each host its own runs folder
    agents = {host: on_host(hosts[host], host, node_command(recipe, runs[host], host, 29400, resume=False))
              for host in runs}
    checkpoints = [runs[host] / "nodes" / "teacher" / "checkpoints" for host in runs]
    deadline = time.monotonic() + 300
    while not any((folder / "step-00000006").is_dir() for folder in checkpoints):  # mid-epoch 2 (5 steps an epoch)
        assert time.monotonic() < deadline and all(agent.poll() is None for agent in agents.values()), \
            [agent.communicate()[1][-2000:] for agent in agents.values() if agent.poll() is not None]
        time.sleep(0.02)
    # host b goes down: every process in its namespace (torchrun starts its worker in a session of its own)
    for pid in subprocess.run(["ip", "netns", "pids", hosts["b"]], capture_output=True, text=True).stdout.split():
        os.kill(int(pid), signal.SIGKILL)
    for agent in agents.values():
        agent.communicate(timeout=300)
    assert agents["a"].returncode != 0  # its peer is gone: the run stops
    written = [host for host in runs if (runs[host] / "nodes" / "teacher" / "checkpoints").is_dir()]
    assert len(written) == 1  # rank 0's host alone holds the checkpoints
    assert not (runs[written[0]] / "nodes" / "teacher" / "result.json").exists()  # killed before the end

    agents = {host: on_host(hosts[host], host, node_command(recipe, runs[host], host, 29401, resume=True))
              for host in runs}
    outputs = {host: agent.communicate(timeout=600) for host, agent in agents.items()}
    for host, agent in agents.items():
        assert agent.returncode == 0, outputs[host][1][-3000:]
    finished = [host for host in runs if (runs[host] / "nodes" / "teacher" / "result.json").is_file()]
    assert len(finished) == 1
    result = json.loads((runs[finished[0]] / "nodes" / "teacher" / "result.json").read_text())
    assert result["steps"] == 50
    # resumed from the newest checkpoint (not from scratch), which the other host received over the process group
    stderr = "".join(err for _, err in outputs.values())
    resumed = [int(step) for step in re.findall(r"resuming at step (\d+)", stderr)]
    assert resumed and 6 <= resumed[0] < 50, stderr[-3000:]
    assert re.search(rf"teacher: the checkpoint step {resumed[0]} from .* \(rank \d\) sent to rank\(s\) \d", stderr)
    other = runs["b" if finished[0] == "a" else "a"] / "nodes" / "teacher"
    assert (other / "last").resolve().name == f"step-{resumed[0]:08d}" and not (other / "result.json").exists()
    got = load_file(str(runs[finished[0]] / "nodes" / "teacher" / "last" / "model.safetensors"))
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_a_stage_folder_travels_whole_and_names_cannot_leave_it(tmp_path):
    """What share_stage sends: the recipe, metrics, result and the last/best checkpoints with their links, written
    back as the same folder; a message naming a file outside the folder is refused before anything is written."""
    stage = tmp_path / "sent" / "teacher"
    (stage / "checkpoints" / "step-00000003").mkdir(parents=True)
    (stage / "checkpoints" / "step-00000003" / "model.safetensors").write_bytes(b"weights")
    (stage / "checkpoints" / "step-00000003" / "state.pt").write_bytes(b"state")
    (stage / "recipe.toml").write_text("name = 'x'\n")
    (stage / "metrics.jsonl").write_text('{"step": 3}\n')
    for link in ("last", "best"):
        (stage / link).symlink_to(Path("checkpoints") / "step-00000003")
    received = tmp_path / "received" / "teacher"
    received.mkdir(parents=True)
    (received / "stale.txt").write_text("an older copy")
    unpack(pack(stage), received)
    assert (received / "last" / "model.safetensors").read_bytes() == b"weights"
    assert os.readlink(received / "best") == "checkpoints/step-00000003"
    assert (received / "metrics.jsonl").read_text() == '{"step": 3}\n' and not (received / "stale.txt").exists()
    assert list((received.parent / ".stale").glob("teacher-*/stale.txt"))  # the older copy kept aside

    from kdforge.errors import CheckpointError

    message = pack(stage)
    size = int.from_bytes(message[:8], "little")
    manifest = json.loads(message[8:8 + size])
    manifest["files"][0][0] = "../../escaped.txt"
    head = json.dumps(manifest).encode()
    with pytest.raises(CheckpointError, match="refusing a received file named '../../escaped.txt'"):
        unpack(len(head).to_bytes(8, "little") + head + message[8 + size:], tmp_path / "other" / "teacher")
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "other").exists()
