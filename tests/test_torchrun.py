"""torchrun.sh: launches through the interpreter that has torch (no `torchrun` on PATH), finds the SLURM
rendezvous host without scontrol, and refuses a multi-node launch it cannot point at node 0."""

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKER = """
import os, sys
with open(os.path.join(sys.argv[1], f"rank{os.environ['RANK']}"), "w") as f:
    f.write(os.environ["WORLD_SIZE"])
"""


def executable(path: Path, body: str) -> Path:
    """Write a shell script at `path` and make it executable."""
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


def torchrun(args, env, command=None) -> subprocess.CompletedProcess:
    """Run `bash torchrun.sh *args` (or the shell `command`) in the repository with exactly `env`, plus a
    PATH without scontrol unless `env` sets one."""
    env = {"PATH": "/usr/bin:/bin", **env}
    assert shutil.which("scontrol", path=env["PATH"]) is None
    return subprocess.run(
        ["bash", "-c", command] if command else ["bash", str(ROOT / "torchrun.sh"), *args],
        cwd=ROOT,
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("python", ["python3 on PATH", "PYTHON set", "python before the script"])
def test_launches_without_torchrun_on_path(tmp_path, python):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    env = {"PYTHONPATH": str(ROOT), "NPROC_PER_NODE": "2", "PATH": f"{bin_dir}:/usr/bin:/bin"}
    if python == "PYTHON set":  # the python3 on PATH must not be used
        executable(bin_dir / "python3", 'echo "python3 on PATH was used" >&2; exit 1')
        env["PYTHON"] = sys.executable
    else:  # python3 on PATH has torch, but its scripts (torchrun) are not on PATH. A wrapper, not a
        # symlink: a venv's python linked elsewhere loses its pyvenv.cfg and starts the base interpreter.
        executable(bin_dir / "python3", f'exec {shlex.quote(sys.executable)} "$@"')
    assert shutil.which("torchrun", path=env["PATH"]) is None
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    prefix = ["python"] if python == "python before the script" else []
    proc = torchrun([*prefix, str(script), str(tmp_path)], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [(tmp_path / f"rank{r}").read_text() for r in range(2)] == ["2", "2"]


def launch_args(tmp_path, args, command=None, **env) -> list[str]:
    """The arguments torchrun.sh hands its interpreter (a stand-in that prints them) for `args` and `env`."""
    echo = executable(tmp_path / "python", 'printf "%s\\n" "$@"')
    proc = torchrun(args, {"PYTHON": str(echo), "NPROC_PER_NODE": "1", **env}, command)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def option(args: list[str], name: str) -> str:
    """The value after `name` in torchrun's arguments."""
    return args[args.index(name) + 1]


@pytest.mark.parametrize(
    "nodelist, first",
    [
        ("node7", "node7"),
        ("node7,node3", "node7"),
        ("node[01-03,07]", "node01"),
        ("node[01-03,07],gpu-a[1-2]", "node01"),
        ("gpu-a[1-2],node[01-03,07]", "gpu-a1"),
        ("login,node[1-4]", "login"),
        ("n1r[7,2-3]", "n1r7"),  # digits in the prefix; the list's order, not the lowest number
        ("node[001-120]", "node001"),  # zero padding kept as written
        ("node[9-11]", "node9"),
        ("node[3]", "node3"),
        ("node[1-2]-ib", "node1-ib"),  # a suffix after the brackets
        ("rack[2-3]-n[05,9],x1", "rack2-n05"),  # two bracket groups in one host
        ("cn-[10-12],cn-[1-2]", "cn-10"),
        ("a.b_c[4-5]", "a.b_c4"),
    ],
)
def test_slurm_rendezvous_host_without_scontrol(tmp_path, nodelist, first):
    slurm = {"SLURM_NNODES": "3", "SLURM_NODEID": "2", "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": nodelist}
    args = launch_args(tmp_path, ["python", "train.py", "--config", "c.yaml"], **slurm)
    assert args[:2] == ["-m", "torch.distributed.run"]
    assert option(args, "--rdzv_endpoint") == f"{first}:29500"
    assert [option(args, name) for name in ("--nnodes", "--node_rank", "--rdzv_id")] == ["3", "2", "4242"]
    assert args[-3:] == ["train.py", "--config", "c.yaml"]


def test_master_addr_wins_and_one_slurm_node_is_standalone(tmp_path):
    slurm = {"SLURM_NNODES": "2", "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "node[1-2]"}
    args = launch_args(tmp_path, ["train.py"], MASTER_ADDR="10.0.0.5", MASTER_PORT="1234", **slurm)
    assert option(args, "--rdzv_endpoint") == "10.0.0.5:1234"
    args = launch_args(tmp_path, ["train.py"], **{**slurm, "SLURM_NNODES": "1"})
    assert "--standalone" in args and "--rdzv_endpoint" not in args


@pytest.mark.parametrize(
    "env, message",
    [
        ({"NNODES": "2"}, "torchrun.sh: NNODES=2 needs MASTER_ADDR"),
        ({"SLURM_NNODES": "2", "SLURM_JOB_NODELIST": ""}, "torchrun.sh: NNODES=2 needs MASTER_ADDR"),
        *(
            ({"SLURM_NNODES": "2", "SLURM_JOB_NODELIST": bad}, f"SLURM_JOB_NODELIST='{bad}'; set MASTER_ADDR")
            for bad in ["node[01-03", "node[a-b]", "node[1-2]]", "node]1", ",node1", "node[]", "node[-2]"]
        ),
    ],
)
def test_multinode_without_a_host_fails_in_one_line(tmp_path, env, message):
    ran = tmp_path / "ran"
    python = executable(tmp_path / "python", f"touch {ran}")
    proc = torchrun(["train.py"], {"PYTHON": str(python), "NPROC_PER_NODE": "1", **env})
    assert proc.returncode == 2
    assert message in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert not ran.exists()  # nothing launched, least of all a rendezvous on 127.0.0.1


def test_usage_examples_work_as_typed(tmp_path):
    proc = torchrun(["--help"], {})
    assert proc.returncode == 0 and proc.stderr == ""
    bare = torchrun([], {})
    assert bare.returncode == 2 and bare.stderr == proc.stdout
    examples = [line.strip() for line in proc.stdout.splitlines() if line.strip().startswith("./torchrun.sh")]
    assert len(examples) == 2
    for example in examples:
        words = shlex.split(example, comments=True)
        assert not any(c in w for w in words for c in "[]<>") and "..." not in words, example
        args = launch_args(tmp_path, [], command=example)  # as typed, in the repository
        script = words.index("recipes/pretrain.py")
        assert args[args.index("recipes/pretrain.py") :] == words[script:]
        assert (ROOT / option(args, "--config")).is_file()
