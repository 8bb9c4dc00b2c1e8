"""pico.run_dir: paths, step discovery, `latest`, the key format and the atomic step writer."""

import pytest

from pico.run_dir import (
    LATEST,
    RunDirError,
    checkpoints_dir,
    dynamics_file,
    latest_checkpoint,
    list_steps,
    model_config_file,
    module_matches,
    new_step_dir,
    parse_key,
    publish_step,
    resolve_resume,
    step_dir,
    tensor_key,
)


def test_layout_and_keys(tmp_path):
    assert step_dir(tmp_path, 30) == tmp_path / "checkpoints" / "step_30"
    assert (
        dynamics_file(step_dir(tmp_path, 30), "eval")
        == tmp_path / "checkpoints/step_30/learning_dynamics/eval.safetensors"
    )
    key = tensor_key("gradients", "layers.3.attention.v_proj")
    assert key == "gradients.layers.3.attention.v_proj"
    assert parse_key(key) == ("gradients", "layers.3.attention.v_proj")
    assert parse_key("input_ids") is None and parse_key("activations.") is None
    assert model_config_file(step_dir(tmp_path, 30)) == tmp_path / "checkpoints/step_30/model/config.json"


def test_suffix_matching_on_dot_boundaries():
    assert module_matches("layers.3.attention.v_proj", "attention.v_proj")
    assert module_matches("layers.3.attention.v_proj", "v_proj")
    assert module_matches("de_embedding_proj", "de_embedding_proj")
    assert not module_matches("de_embedding_proj", "embedding_proj")


def test_steps_are_published_atomically(tmp_path):
    assert latest_checkpoint(tmp_path) is None and resolve_resume(tmp_path, "auto") is None
    for step in (0, 10):
        tmp = new_step_dir(tmp_path, step)
        assert tmp.name == f".tmp_step_{step}" and not list(tmp.iterdir())
        (tmp / "state").mkdir()
        publish_step(checkpoints_dir(tmp_path), tmp, step)
    assert (checkpoints_dir(tmp_path) / LATEST).read_text() == "step_10\n"
    assert latest_checkpoint(tmp_path) == step_dir(tmp_path, 10)
    assert list_steps(tmp_path, require="state") == [0, 10]
    (new_step_dir(tmp_path, 20) / "state").mkdir()  # a write that never got published
    assert latest_checkpoint(tmp_path) == step_dir(tmp_path, 10) and not step_dir(tmp_path, 20).exists()
    assert resolve_resume(tmp_path, "never") is None
    assert resolve_resume(tmp_path, str(step_dir(tmp_path, 0))) == step_dir(tmp_path, 0)
    with pytest.raises(RunDirError, match="is not a checkpoint directory"):
        resolve_resume(tmp_path, str(tmp_path / "nope"))
    with pytest.raises(RunDirError, match="no step_<N>/learning_dynamics folders"):
        list_steps(tmp_path)
    (checkpoints_dir(tmp_path) / LATEST).write_text("step_20\n")  # names a step that was never published
    with pytest.raises(RunDirError, match=r"latest: names step_20, which has no state/ directory$"):
        latest_checkpoint(tmp_path)
    with pytest.raises(RunDirError, match=r"nope: not a run directory \(no checkpoints/ folder\)$"):
        list_steps(tmp_path / "nope")
