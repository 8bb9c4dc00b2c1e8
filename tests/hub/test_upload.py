"""The uploader and the journal on hand-made step directories, against the local stand-in (no training)."""

import json
import time
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

import pico.hub.cli
from pico.hub import HubError, Uploader, read_journal, ref_name, resume_source, step_tag
from pico.manifest import hash_file, write_manifest
from pico.run_dir import step_dir

REPO = "me/pico-runs"


def make_steps(run_dir, steps=(0, 2), shards=1, manifest=True):
    """Published step dirs with the files a checkpoint holds: a real (tiny) DCP state, fake contents for
    the rest, and (unless not `manifest`) the manifest listing them all."""
    (run_dir / "config.yaml").parent.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text("training: {max_steps: 2}\n")
    for step in steps:
        path = step_dir(run_dir, step)
        dcp.save({"w": torch.full((4,), float(step))}, checkpoint_id=path / "state")  # .metadata, __0_0
        for name, text in {
            "model/config.json": "{}",
            "model/model.safetensors": f"weights {step}",
            "learning_dynamics/train.safetensors": f"train {step}",
            "eval.json": json.dumps({"step": step}),
            **{f"state/__{r}_0.distcp": f"shard {r} {step}" for r in range(1, shards)},
        }.items():
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            (path / name).write_text(text)
        if manifest:
            files = [p for p in path.rglob("*") if p.is_file()]
            write_manifest(path, {p.relative_to(path).as_posix(): hash_file(p) for p in files})
    return run_dir


def titles(hub, branch):
    return [c.title for c in hub.list_commits(REPO, branch)][::-1]


def test_one_commit_and_tag_per_step_after_failures(tmp_path, hub):
    run = make_steps(tmp_path / "run-a")
    hub.set_faults(fail={"create_commit": 2})  # the first two commit attempts fail, then the Hub answers
    up = Uploader(run, REPO, backoff=0.01).start()
    up.enqueue(2)
    assert up.finish(timeout=30) == []
    assert titles(hub, "run-a") == ["initial commit", "step 0", "step 2"]
    assert len(hub.calls("create_commit")) == 4
    repo = hub.repo(REPO)
    assert set(repo["tags"]) == {"run-a/step_0", "run-a/step_2"}
    files = hub.list_files(REPO, "run-a/step_2")
    assert {
        "config.json",
        "model.safetensors",
        "learning_dynamics/train.safetensors",
        "state/.metadata",
        "state/__0_0.distcp",
        "eval.json",
        "config.yaml",
    } <= set(files)
    assert read_journal(run, f"{REPO}@run-a") == {s: repo["tags"][f"run-a/step_{s}"] for s in (0, 2)}


def test_stale_files_of_the_previous_step_are_deleted(tmp_path, hub):
    run = make_steps(tmp_path / "run", steps=(0,), shards=2)  # written by 2 ranks
    Uploader(run, REPO).start().finish(timeout=30)
    make_steps(run, steps=(2,), shards=1)  # resumed on 1 rank: one shard
    Uploader(run, REPO).start().finish(timeout=30)
    assert "state/__1_0.distcp" in hub.list_files(REPO, "run/step_0")
    assert "state/__1_0.distcp" not in hub.list_files(REPO, "run/step_2")


def test_a_commit_that_landed_is_not_made_twice(tmp_path, hub):
    run = make_steps(tmp_path / "run")
    Uploader(run, REPO).start().finish(timeout=30)
    (run / "checkpoints" / "hub.json").unlink()  # as if killed after the commit, before the journal
    hub.delete_tag(REPO, "run/step_2")  # ... and before its tag
    up = Uploader(run, REPO).start()
    assert up.finish(timeout=30) == []
    assert hub.repo(REPO)["tags"]["run/step_2"] == hub.list_commits(REPO, "run")[0].id
    assert titles(hub, "run").count("step 2") == 1
    assert len(hub.calls("create_commit")) == 2
    assert read_journal(run, f"{REPO}@run").keys() == {0, 2}


def test_no_permission_fails_at_start(tmp_path, hub):
    hub.set_faults(forbidden=["someone/else"])
    with pytest.raises(HubError, match="someone/else: not allowed"):
        Uploader(make_steps(tmp_path / "run"), "someone/else").start()


def test_offline_keeps_steps_pending_then_cli_uploads(tmp_path, hub, capsys):
    run = make_steps(tmp_path / "run")
    hub.set_faults(offline=True)
    up = Uploader(run, REPO, backoff=0.01).start()
    assert up.finish(timeout=30) == [0, 2]
    out = capsys.readouterr().out
    assert "unreachable" in out and f"python -m pico.hub upload {run} --repo-id {REPO} --branch run" in out
    assert read_journal(run, f"{REPO}@run") == {}
    hub.set_faults()
    with pytest.raises(SystemExit) as e:
        pico.hub.cli.main(["upload", str(run), "--repo-id", REPO])
    assert e.value.code == 0
    assert titles(hub, "run") == ["initial commit", "step 0", "step 2"]


def test_cli_without_repo_is_one_line(tmp_path, hub, capsys):
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(SystemExit) as e:
        pico.hub.cli.main(["upload", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hub error:") and "--repo-id" in err and "\n" not in err


def test_resume_source_downloads_only_state_config_and_manifest(tmp_path, hub):
    run = make_steps(tmp_path / "run")
    Uploader(run, REPO).start().finish(timeout=30)
    folder = resume_source(f"hf://{REPO}@run/step_0", None, run)
    assert (tmp_path / "standin" / "cache").exists()
    (download,) = hub.calls("downloaded")
    assert download["files"] == ["config.yaml", "manifest.json", "state/.metadata", "state/__0_0.distcp"]
    local = step_dir(run, 0) / "state" / ".metadata"
    assert (Path(folder) / "state" / ".metadata").read_bytes() == local.read_bytes()
    assert resume_source("auto", None, run) == "auto"


def test_resume_without_state_or_steps_is_one_line(tmp_path, hub):
    run = make_steps(tmp_path / "run")
    Uploader(run, REPO, upload_state=False).start().finish(timeout=30)
    with pytest.raises(HubError, match=r"me/pico-runs@run/step_2: no state/"):
        resume_source(f"hf://{REPO}@run/step_2", None, run)
    hub.add_commit(REPO, "other", "README", {"README.md": b"hi"})
    cfg = type("Hub", (), {"repo_id": REPO, "branch": "other"})
    with pytest.raises(HubError, match=r"me/pico-runs@other: no commit titled 'step <N>'"):
        resume_source("hub", cfg, run)


def test_ref_names():
    assert ref_name("my run: 1") == "my-run-1"
    assert ref_name("a..b/") == "a.b"
    assert step_tag("pico-decoder-tiny-1", 1000) == "pico-decoder-tiny-1/step_1000"


def test_backoff_holds_while_steps_are_published(tmp_path, hub):
    """With the real backoff (1 s, doubling), steps published while the Hub is down do not cut the waits
    short: the attempts stay 1 s, then 2 s apart, a handful of calls in 3.5 s; finish() ends a wait."""
    run = make_steps(tmp_path / "run", steps=(0,))
    hub.set_faults(offline=True)  # every attempt is one call (create_repo), which fails
    up = Uploader(run, REPO, backoff=1.0, echo=lambda line: None).start()
    start = time.time()
    for step in (2, 4, 6):
        time.sleep(1.0)
        make_steps(run, steps=(step,))
        up.enqueue(step)
    time.sleep(start + 3.5 - time.time())
    attempts = [c["time"] for c in hub.calls()]
    assert 3 <= len(attempts) <= 5, f"{len(attempts)} calls in 3.5 s"  # start() + the worker at 0, 1, (3) s
    gaps = [b - a for a, b in zip(attempts[1:], attempts[2:])]
    assert gaps[0] >= 0.95 and all(g >= 1.95 for g in gaps[1:]), gaps
    hub.set_faults()  # the network is back; the worker sleeps until about 7 s
    finish = time.time()
    assert up.finish(timeout=30) == []
    assert time.time() - finish < 3  # finish() woke it
    assert titles(hub, "run") == ["initial commit", "step 0", "step 2", "step 4", "step 6"]
    assert len(hub.calls("create_commit")) == 4


def test_cli_reads_only_the_hub_section_of_a_forks_config(tmp_path, hub, capsys):
    run = make_steps(tmp_path / "fork-run")
    (run / "config.yaml").write_text(f"checkpointing: {{hub: {{repo_id: {REPO}}}}}\nrelora: {{rank: 8}}\n")
    with pytest.raises(SystemExit) as e:
        pico.hub.cli.main(["upload", str(run)])
    assert e.value.code == 0, capsys.readouterr().err
    assert titles(hub, "fork-run") == ["initial commit", "step 0", "step 2"]
    (run / "config.yaml").write_text("checkpointing: {hub: {repo_id: me/x, token: abc}}\n")
    with pytest.raises(SystemExit) as e:
        pico.hub.cli.main(["upload", str(run)])
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith("config error: checkpointing.hub.token: unknown key")
