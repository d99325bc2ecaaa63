"""The launcher's environment (torchrun's and LeaderWorkerSet's variables) read into one checked
LaunchEnv, and what each rank of a launched group runs (afdserve.launch.torchrun.plan)."""

from __future__ import annotations

import pytest

from afdserve.errors import UserInputError
from afdserve.launch.launch_env import LaunchEnv
from afdserve.launch.torchrun_cli import plan

TORCHRUN = {
    "MASTER_ADDR": "127.0.0.1",
    "MASTER_PORT": "29500",
    "RANK": "3",
    "WORLD_SIZE": "4",
    "LOCAL_RANK": "1",
    "GROUP_RANK": "1",
    "TORCHELASTIC_RESTART_COUNT": "2",
}
LWS = {"LWS_LEADER_ADDRESS": "10.0.0.7", "LWS_GROUP_SIZE": "4", "LWS_WORKER_INDEX": "2"}


def test_torchrun_environment():
    env = LaunchEnv.from_environ(TORCHRUN)
    assert env == LaunchEnv("torchrun", 3, 4, "127.0.0.1", 29500, 1, 1, 2)


def test_lws_environment_and_torchrun_inside_lws_wins():
    assert LaunchEnv.from_environ(LWS) == LaunchEnv("lws", 2, 4, "10.0.0.7", None, 0, 2, 0)
    assert LaunchEnv.from_environ(LWS | TORCHRUN).source == "torchrun"


@pytest.mark.parametrize(
    "env,match",
    [
        ({}, "not started by a launcher"),
        ({"RANK": "0", "WORLD_SIZE": "2"}, "MASTER_ADDR is not set"),
        (TORCHRUN | {"RANK": "x"}, "RANK='x' is not an integer"),
        (TORCHRUN | {"RANK": "4"}, "rank 4 is outside a world of 4"),
        (TORCHRUN | {"WORLD_SIZE": "0"}, "world size must be >= 1"),
        (TORCHRUN | {"MASTER_PORT": "70000"}, "MASTER_PORT must be in 1..65535"),
        (TORCHRUN | {"LOCAL_RANK": "-1"}, "LOCAL_RANK must be >= 0"),
        (TORCHRUN | {"MASTER_ADDR": " "}, "MASTER_ADDR is not set"),
        ({k: v for k, v in TORCHRUN.items() if k != "WORLD_SIZE"}, "WORLD_SIZE is not set"),
        ({"LWS_GROUP_SIZE": "3", "LWS_WORKER_INDEX": "0"}, "LWS_LEADER_ADDRESS is not set"),
        (LWS | {"LWS_WORKER_INDEX": "two"}, "LWS_WORKER_INDEX='two'"),
    ],
)
def test_bad_environments_name_the_variable(env, match):
    with pytest.raises(UserInputError, match=match):
        LaunchEnv.from_environ(env)


ROLES = ["--roles", "front,attention:2,ffn:1", "--front-port", "31000"]


def test_each_rank_runs_its_role():
    front = plan([*ROLES, "--", "--model", "builtin:tiny-llama"], TORCHRUN | {"RANK": "0"})
    assert front.role == "front" and front.keep_front and front.front == "127.0.0.1:31000"
    assert front.argv == (
        "--model", "builtin:tiny-llama", "--transport", "tcp", "--attention-workers", "2",
        "--ffn-workers", "1", "--front", "127.0.0.1:31000",
    )  # fmt: skip
    ffn = plan([*ROLES, "--", "--model", "builtin:tiny-llama"], TORCHRUN)
    assert ffn.role == "ffn0"
    assert ffn.argv == (
        "worker", "--front", "127.0.0.1:31000", "--rank", "2", "--host", "127.0.0.1",
        "--connect-timeout-s", "60.0",
    )  # fmt: skip
    a1 = plan([*ROLES, "--host", "10.1.1.1"], TORCHRUN | {"RANK": "2"})
    assert a1.role == "attention1" and a1.argv[4:7] == ("1", "--host", "10.1.1.1")


def test_under_lws_the_front_is_the_leader_and_execs_itself():
    p = plan(["--front-port", "31000"], LWS | {"LWS_WORKER_INDEX": "0"})
    assert p.role == "front" and not p.keep_front and p.front == "10.0.0.7:31000"
    w = plan(["--front-port", "31000"], LWS | {"AFDSERVE_HOST": "10.0.0.9"})
    assert w.argv[1:7] == ("--front", "10.0.0.7:31000", "--rank", "1", "--host", "10.0.0.9")


def test_a_leader_named_by_dns_binds_its_own_ip_and_workers_dial_the_name():
    """LWS_LEADER_ADDRESS is a DNS name that may not resolve before the leader is up: the
    leader binds its pod IP ($AFDSERVE_HOST), the workers keep the name (ZeroMQ resolves it)."""
    lws = LWS | {"LWS_LEADER_ADDRESS": "afd-0.afd.default"}
    leader = plan([], lws | {"LWS_WORKER_INDEX": "0", "AFDSERVE_HOST": "10.0.0.7"})
    assert leader.front == "10.0.0.7:29600" and leader.argv[-2:] == ("--front", "10.0.0.7:29600")
    w = plan([], lws | {"AFDSERVE_HOST": "10.0.0.9"})
    assert w.argv[1:3] == ("--front", "afd-0.afd.default:29600")


@pytest.mark.parametrize(
    "argv,env,match",
    [
        (["--roles", "front,attention,ffn"], TORCHRUN, "names 3 ranks .* started 4"),
        (["--roles", "attention:3,ffn"], TORCHRUN, "has no front"),
        (["--roles", "attention:2,front,ffn"], TORCHRUN, "front is rank 2"),
        ([*ROLES, "--", "--attention-workers", "3"], TORCHRUN, "disagrees with --roles"),
        ([*ROLES, "--", "--max-attention-workers", "4"], TORCHRUN, "no free attention slot"),
        ([*ROLES, "--", "--transport", "shm"], TORCHRUN, "does not cross hosts"),
        ([*ROLES, "--", "--mode", "aggregated"], TORCHRUN, "runs AFD"),
        ([*ROLES, "--", "--no-such-flag"], TORCHRUN, "not `afdserve serve`'s"),
        ([*ROLES, "--", "--front", "1.2.3.4:5"], TORCHRUN, "not after --"),
        (["--roles", "front,attention:2,ffn", "--front-port", "0"], TORCHRUN, "--front-port"),
        ([*ROLES, "--lease-timeout", "0"], TORCHRUN, "--lease-timeout must be > 0"),
    ],
)
def test_bad_launches_fail_on_every_rank(argv, env, match):
    with pytest.raises(UserInputError, match=match):
        plan(argv, env)


def test_a_front_outside_the_launcher():
    p = plan(["--roles", "attention:3,ffn", "--front", "10.2.2.2:7000"], TORCHRUN)
    assert p.role == "ffn0" and p.argv[1:5] == ("--front", "10.2.2.2:7000", "--rank", "3")
