"""Bad Hub endpoints give one line in bounded time (docs/hub.md, "Timeouts and retries"): a server that
accepts connections and never answers, one that answers 503 to everything, a run directory that is none.

The recipes run in subprocesses with HF_ENDPOINT pointing at a local server (threads of this process), and
huggingface_hub's timeouts at 1 s so that the bounds stay short.
"""

import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from tokenizers import Tokenizer, models

import pico.hub.cli
from tests.recipes.common import ROOT, launch
from tests.tiny import tiny_run, write_shards

TIMEOUT = 1  # HF_HUB_ETAG_TIMEOUT and HF_HUB_DOWNLOAD_TIMEOUT, seconds


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("data") / "train", 64, seed=1)


@pytest.fixture
def silent():
    """A local TCP server that accepts every connection and never answers; its URL."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted = []

    def accept():
        while True:
            try:
                accepted.append(server.accept()[0])
            except OSError:  # closed at the end of the test
                return

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.close()
    for connection in accepted:
        connection.close()


class Unavailable(BaseHTTPRequestHandler):
    """Answers every request 503 with Retry-After: 0, so that huggingface_hub retries, five times, at once."""

    def answer(self):
        self.send_response(503)
        self.send_header("Retry-After", "0")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    do_GET = do_HEAD = do_POST = answer

    def log_message(self, *args):
        pass


@pytest.fixture
def unavailable():
    """A local HTTP server that answers 503 to everything; its URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), Unavailable)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def hub_env(endpoint):
    return {
        "HF_ENDPOINT": endpoint,
        "HF_HUB_OFFLINE": "0",
        "HF_DATASETS_OFFLINE": "0",
        "HF_HUB_ETAG_TIMEOUT": str(TIMEOUT),
        "HF_HUB_DOWNLOAD_TIMEOUT": str(TIMEOUT),
    }


def test_a_silent_hub_at_start_up_lets_training_run_and_reports_the_steps_pending(silent, data, tmp_path):
    run = tmp_path / "run"
    start = time.monotonic()
    proc = launch(
        tiny_run(data, run, "checkpointing.hub.repo_id=me/r", steps=2, save_every=2), env=hub_env(silent)
    )
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert time.monotonic() - start < 60
    warning, pending = [line for line in proc.stdout.splitlines() if line.startswith("hub:")]
    assert warning.startswith("hub: warning: me/r: Hub unreachable (")  # a ReadTimeout, or the deadline's
    assert warning.endswith("; training goes on and uploads wait for the network")
    assert pending.startswith("hub: steps [0, 2] are not on me/r@run yet (me/r: Hub unreachable (")
    assert pending.endswith(f"retry with: python -m pico.hub upload {run} --repo-id me/r --branch run")
    assert (run / "checkpoints" / "step_2" / "state").is_dir()


def test_resuming_from_a_silent_hub_is_one_line_within_the_bound(silent, data, tmp_path):
    start = time.monotonic()
    proc = launch(
        tiny_run(data, tmp_path / "run", "checkpointing.hub.repo_id=me/r", "checkpointing.resume=hub"),
        env=hub_env(silent),
        check=False,
    )
    assert time.monotonic() - start < 60
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        f"hub error: me/r@run: Hub unreachable (TimeoutError: no answer within {3 * TIMEOUT} s "
        "(HF_HUB_DOWNLOAD_TIMEOUT sets it))"
    ]
    assert not (tmp_path / "run").exists()


def test_retries_are_quiet_and_the_cause_comes_once(unavailable, tmp_path):
    """A model on the Hub, and a dataset of the `datasets` library: huggingface_hub retries each 503 five
    times; none of its retry lines reaches stderr, only pico's line with the cause."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **hub_env(unavailable)}
    model = launch(
        ["--model", "hf://me/m", "--task", "hellaswag"], env=env, check=False, recipe="recipes/evaluate.py"
    )
    assert model.returncode == 2 and model.stderr.splitlines() == [
        "hub error: me/m@main: the Hub did not answer (HTTP 503: Server error '503 Service Unavailable' for "
        f"url '{unavailable}/api/models/me/m/commits/main')"
    ], model.stderr[-3000:]
    tokenizer = Tokenizer(models.WordLevel({"<|endoftext|>": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tokenizer.save(str(tmp_path / "tok.json"))
    prepare = [
        sys.executable,
        "-m",
        "pico.data.prepare",
        "--input",
        "me/d",
        "--tokenizer",
        str(tmp_path / "tok.json"),
    ]
    dataset = subprocess.run(
        [*prepare, "--seq-len", "4", "--out", str(tmp_path / "out")], env=env, capture_output=True, text=True
    )
    lines = dataset.stderr.splitlines()
    assert dataset.returncode == 2 and len(lines) == 1, dataset.stderr[-3000:]
    assert lines[0].startswith("data error: me/d: no such file, and not a dataset that loads (")
    assert not (tmp_path / "out").exists()


def test_uploading_a_run_directory_that_is_none_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        pico.hub.cli.main(["upload", str(tmp_path / "nonexistent" / "run"), "--repo-id", "me/r"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"run error: {tmp_path}/nonexistent/run: not a run directory (no checkpoints/ folder)"
    ]
