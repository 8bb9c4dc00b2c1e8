"""Files in and out: `python -m pico.data.prepare`'s bad inputs are one line each and write nothing; a
full disk mid-run is one line naming the path and leaves the run resumable; a run's files follow the umask."""

import os
import re
import shutil
import stat
import subprocess
import sys

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from pico.data.prepare import main as prepare
from tests.recipes.common import ROOT, launch
from tests.tiny import tiny_run, write_shards


@pytest.fixture
def inputs(tmp_path):
    """A word-level tokenizer with an EOS, a good document, and one bad input of each kind."""
    tok = Tokenizer(models.WordLevel({"<|endoftext|>": 0, "[UNK]": 1, "a": 2, "b": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "tok.json"))
    (tmp_path / "doc.txt").write_text("a b a b a b\n")
    (tmp_path / "broken.jsonl").write_text('{"text": "a b"}\n{"text": "a\n')
    (tmp_path / "list.jsonl").write_text("[1, 2]\n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "garbage.json").write_text("garbage")
    (tmp_path / "not_a_tokenizer.json").write_text('{"version": "1.0"}')
    (tmp_path / "a_file").write_text("")
    return tmp_path


# name → (arguments, with {d} for the inputs' folder; the one line)
PREPARE_CASES = {
    "a line that is not JSON": (
        "--input {d}/broken.jsonl",
        "data error: {d}/broken.jsonl: line 2 is not JSON (Unterminated string starting at)",
    ),
    "a line that is no object": (
        "--input {d}/list.jsonl",
        "data error: {d}/list.jsonl: line 1 has no string field 'text'",
    ),
    "text that is not UTF-8": (
        "--input {d}/latin1.txt",
        "data error: {d}/latin1.txt: not UTF-8 text (byte 3: unexpected end of data)",
    ),
    "a missing input file": (
        "--input {d}/missing.txt",
        "data error: {d}/missing.txt: no such file or directory",
    ),
    "a column that is not there": (
        "--input {d}/broken.jsonl --text-column body",
        "data error: {d}/broken.jsonl: line 1 has no string field 'body'",
    ),
    "a tokenizer that is no JSON": (
        "--input {d}/doc.txt --tokenizer {d}/garbage.json",
        "data error: {d}/garbage.json: not a tokenizers file (expected value at line 1 column 1)",
    ),
    "JSON that is no tokenizer": (
        "--input {d}/doc.txt --tokenizer {d}/not_a_tokenizer.json",
        "data error: {d}/not_a_tokenizer.json: not a tokenizers file (Model missing. at line 1 column 18)",
    ),
    "an output under a file": (
        "--input {d}/doc.txt --out {d}/a_file/out",
        "data error: {d}/a_file/out: cannot write there ({d}/a_file is a file, not a directory)",
    ),
    "an output that cannot be made": (
        "--input {d}/doc.txt --out /proc/pico-out",
        "data error: /proc/pico-out/train: cannot write the shards (No such file or directory)",
    ),
    "more shards than rows": (
        "--input {d}/doc.txt --shards 9",
        "data error: {d}/out/train: 2 rows cannot fill 9 shards; use fewer shards or more text",
    ),
}


@pytest.mark.parametrize("case", PREPARE_CASES)
def test_prepare_bad_inputs(inputs, capsys, case):
    given, line = PREPARE_CASES[case]
    argv = given.format(d=inputs).split()
    for flag, value in (("--tokenizer", f"{inputs}/tok.json"), ("--out", f"{inputs}/out")):
        argv += [] if flag in argv else [flag, value]
    before = sorted(inputs.rglob("*"))
    with pytest.raises(SystemExit) as exit_:
        prepare([*argv, "--seq-len", "2"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == line.format(d=inputs)  # after the progress lines, if any
    assert sorted(inputs.rglob("*")) == before  # nothing written


def in_a_small_tmpfs(folder, size: str, script: str) -> subprocess.CompletedProcess:
    """Run shell `script` with a tmpfs of `size` mounted on `folder` ($SMALL), in a user and mount namespace
    of its own (no root needed where the kernel allows unprivileged user namespaces; the mount ends with the
    script); skip the test where it cannot."""
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"no user namespaces here: {probe.stderr.decode().strip()}")
    folder.mkdir()
    mount = f"mount -t tmpfs -o size={size} tmpfs $SMALL && {script}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHON": sys.executable}
    env["SMALL"] = str(folder)
    return subprocess.run(
        ["unshare", "-rm", "sh", "-c", mount], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def test_a_full_disk_is_one_line_with_the_path_and_the_run_resumes(tmp_path):
    """Training on a 1.5 MB file system until a checkpoint does not fit: one line naming the step dir, no
    partial .tmp_step_<N> left, and `latest` names a complete step that loads."""
    data = write_shards(tmp_path / "train", 64, seed=1)
    args = " ".join(tiny_run(data, None, steps=40, batch_size=4, save_every=2))
    check = (
        "from pico.checkpoint import check_train_state; from pico.run_dir import latest_checkpoint; import "
        "sys; step = latest_checkpoint(sys.argv[1]); check_train_state(step / 'state'); print(step.name)"
    )
    script = (
        f"$PYTHON recipes/pretrain.py {args} checkpointing.run_dir=$SMALL/run 2>&1 >/dev/null; "
        f'echo "exit $?"; ls -A $SMALL/run/checkpoints; $PYTHON -c "{check}" $SMALL/run'
    )
    proc = in_a_small_tmpfs(tmp_path / "small", "1500k", script)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    error, code, *listing, latest = proc.stdout.splitlines()
    assert code == "exit 2" and "Traceback" not in proc.stdout, proc.stdout
    step = int(error.split(":")[1].removeprefix(" step_"))  # run error: step_N: background write failed ...
    assert error.startswith(
        f"run error: step_{step}: background write failed on rank 0: OSError: [Errno 28] "
    )
    tmp = f"{tmp_path}/small/run/checkpoints/.tmp_step_{step}"  # the step dir, or the file in it that failed
    assert re.search(rf"No space left on device: '{re.escape(tmp)}(/[^']+)?'", error), error
    assert sorted(listing) == ["latest"] + [f"step_{n}" for n in range(0, step, 2)]  # no .tmp_step_<N>
    assert latest == f"step_{step - 2}"  # complete: its state checks, and it loaded


def test_every_file_of_a_run_follows_the_umask(tmp_path):
    """Under umask 027, model.safetensors and the learning dynamics (0600 from safetensors) and the copied
    tokenizer.json (0644 as its source) are 0640 like every other file, and the folders 0750."""
    data = write_shards(tmp_path / "train", 32, seed=1)
    Tokenizer(models.WordLevel({"<|endoftext|>": 0, "[UNK]": 1}, unk_token="[UNK]")).save(
        str(data / "tokenizer.json")
    )
    os.chmod(data / "tokenizer.json", 0o644)
    run = tmp_path / "run"
    old = os.umask(0o027)
    try:
        launch(tiny_run(data, run, steps=1, save_every=1, batch_size=4))
    finally:
        os.umask(old)
    modes = {p.relative_to(run).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in run.rglob("*")}
    assert "checkpoints/step_1/model/tokenizer.json" in modes
    assert "checkpoints/step_1/learning_dynamics/weights.safetensors" in modes
    wrong = {
        name: oct(mode) for name, mode in modes.items() if mode != (0o750 if (run / name).is_dir() else 0o640)
    }
    assert not wrong
    shutil.rmtree(run)
