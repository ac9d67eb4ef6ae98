"""Two hosts and a broken network: two network namespaces joined by a veth pair, made by this
test (as root, with iproute2's ``ip``), each running ``torchrun --nnodes 2`` with two ranks and
a rendezvous on the first host's address.

The job trains a pipeline over all four ranks and a DP 2 x PP 2 mesh whose pipelines cross
the hosts, each against the plain model. Then the test cuts the link mid-step (``ip link set
... down``): every rank must raise a shardpipe error within its timeout, the rank whose only
pending peer is across the cut naming it, and both torchruns exit non-zero. Only the test's
own namespaces and addresses are used.
"""

import os
import pathlib
import shutil
import subprocess
import sys
import time
import uuid

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
SUBNET = "10.213.77"  # a private /24 that lives only between the test's two namespaces
TIMEOUT_S = 8  # what the pipelines wait for a peer
DEADLINE_S = 120

JOB = r'''
import copy, os, pathlib, sys, time
import torch, torch.distributed as dist
from torch import nn
import shardpipe

out = pathlib.Path(sys.argv[1])
timeout = float(sys.argv[2])
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.set_num_threads(1)

def mlp():
    torch.manual_seed(0)
    return nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(8, 8), nn.Tanh())])

def check(pipe, baseline, x, y, share, parts, dp_group=None):
    loss = pipe.train_step(x.chunk(parts)[share], y.chunk(parts)[share], nn.functional.mse_loss)
    if dp_group is not None:
        dist.all_reduce(loss, group=dp_group)
        loss /= dp_group.size()
    expected = nn.functional.mse_loss(baseline(x), y)
    expected.backward()
    torch.testing.assert_close(loss, expected.detach())
    grads = dict(baseline.named_parameters())
    for name, p in pipe.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, msg=name)

x = torch.randn(8, 8, generator=torch.Generator().manual_seed(1))
y = torch.randn(8, 8, generator=torch.Generator().manual_seed(2))
model = mlp()
baseline = copy.deepcopy(model)
pipe = shardpipe.Pipeline(model, group=dist.group.WORLD, chunks=4, timeout=timeout)
check(pipe, baseline, x, y, 0, 1)
mesh = shardpipe.mesh(dp=2, pp=2)
model = mlp()
baseline = copy.deepcopy(model)
hybrid = shardpipe.Pipeline(model, mesh=mesh, chunks=2, timeout=timeout)
check(hybrid, baseline, x, y, mesh["dp"].get_local_rank(), 2, mesh["dp"].get_group())
(out / f"trained{rank}").write_text("ok")

class Wait(nn.Module):
    # The step blocks here, past the round that starts it, until the test has cut the link.
    def forward(self, x):
        (out / "waiting").write_text("now")
        while not (out / "cut").exists():
            time.sleep(0.05)
        return x

cut = shardpipe.Pipeline(nn.Sequential(Wait(), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)),
                         group=dist.group.WORLD, timeout=timeout)
start = time.monotonic()
try:
    cut.train_step(x, y, nn.functional.mse_loss)
    outcome = "returned"
except Exception as error:
    outcome = f"{time.monotonic() - start:.1f} s: {type(error).__name__}: {error}"
(out / f"outcome{rank}").write_text(outcome)
# torchrun kills a rank's host-mates once it exits: wait (bounded) until every rank has
# written its own outcome, so that what the test reads is each rank's error, not who exited
# first. A rank that hangs still writes nothing and fails the test.
deadline = time.monotonic() + 3 * timeout
while time.monotonic() < deadline and not all((out / f"outcome{r}").exists() for r in range(world)):
    time.sleep(0.05)
os._exit(3)  # the process group cannot be torn down without its peers
'''


def _ip(*args, netns=None, check=True):
    command = (["ip", "netns", "exec", netns] if netns else []) + ["ip", *args]
    return subprocess.run(command, capture_output=True, text=True, check=check)


def _hosts_or_skip():
    if os.geteuid() != 0:
        pytest.skip("needs root to make network namespaces")
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2's ip")
    tag = uuid.uuid4().hex[:6]
    hosts = [f"sp{tag}a", f"sp{tag}b"]
    made = []
    try:
        for ns in hosts:
            _ip("netns", "add", ns)
            made.append(ns)
    except subprocess.CalledProcessError as error:
        for ns in made:
            _ip("netns", "del", ns, check=False)
        pytest.skip(f"this machine does not allow network namespaces: {error.stderr.strip()}")
    return hosts, [f"v{tag}a", f"v{tag}b"]


@pytest.fixture
def two_hosts():
    hosts, links = _hosts_or_skip()
    try:
        _ip("link", "add", links[0], "type", "veth", "peer", "name", links[1])
        for k, (ns, link) in enumerate(zip(hosts, links)):
            _ip("link", "set", link, "netns", ns)
            _ip("addr", "add", f"{SUBNET}.{k + 1}/24", "dev", link, netns=ns)
            _ip("link", "set", link, "up", netns=ns)
            _ip("link", "set", "lo", "up", netns=ns)
        yield hosts, links
    finally:
        for ns in hosts:
            _ip("netns", "del", ns, check=False)


def test_two_hosts_train_then_a_cut_link_fails_every_rank_in_time(two_hosts, tmp_path):
    hosts, links = two_hosts
    script = tmp_path / "job.py"
    script.write_text(JOB)
    port = 29400 + os.getpid() % 500
    procs = []
    for node, (ns, link) in enumerate(zip(hosts, links)):
        env = dict(os.environ, PYTHONPATH=str(REPO / "python"), OMP_NUM_THREADS="1",
                   GLOO_SOCKET_IFNAME=link)
        command = ["ip", "netns", "exec", ns, sys.executable, "-m", "torch.distributed.run",
                   "--nnodes", "2", "--nproc-per-node", "2", "--node-rank", str(node),
                   "--master-addr", f"{SUBNET}.1", "--master-port", str(port),
                   str(script), str(tmp_path), str(TIMEOUT_S)]
        procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not all((tmp_path / f"trained{r}").exists() for r in range(4)):
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                for p in procs:
                    p.kill()
                pytest.fail("the job did not train across the two hosts:\n" +
                            "\n".join(p.communicate(timeout=30)[0][-3000:] for p in procs))
            time.sleep(0.2)
        while not (tmp_path / "waiting").exists():
            if time.monotonic() > deadline:
                pytest.fail("the first stage never started its forward")
            time.sleep(0.05)
        time.sleep(0.5)  # the round before the phase settles on every rank
        _ip("link", "set", links[0], "down", netns=hosts[0])
        cut_at = time.monotonic()
        (tmp_path / "cut").write_text("now")
        outputs = [p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0]
                   for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    elapsed = time.monotonic() - cut_at
    outcomes = {r: (tmp_path / f"outcome{r}").read_text() for r in range(4)
                if (tmp_path / f"outcome{r}").exists()}
    report = "\n".join(f"rank {r}: {o}" for r, o in sorted(outcomes.items())) + "\n" + \
        "\n".join(outputs)[-4000:]
    assert all(p.returncode != 0 for p in procs), report
    assert sorted(outcomes) == [0, 1, 2, 3], report
    for outcome in outcomes.values():
        assert outcome != "returned", report
        seconds = float(outcome.split(" s:")[0])
        # Within one timeout of the last message: a peer's failure record does not restart a
        # rank's clock, so no rank waits two timeouts in a row.
        assert seconds < 1.5 * TIMEOUT_S, report
        # Its own wait's error ("shardpipe: rank r waited in vain ... from rank p"), or the
        # record of a peer that lost its own ("shardpipe: rank p failed ...").
        assert "shardpipe: rank " in outcome and "from rank " in outcome, report
    # Rank r runs on host r // 2: rank 1's only pending message is rank 2's, across the cut.
    # (Rank 2 waits on rank 1 and on rank 3 alike from the start of the phase, and whichever
    # wait expires first is the one it names.) Rank 3 hears from rank 2, on its own host,
    # that rank 2 lost a peer, and gives up at once instead of waiting for the exchange.
    assert "from rank 2" in outcomes[1], report
    assert elapsed < DEADLINE_S, report
