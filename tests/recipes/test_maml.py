"""recipes/maml.py: the episode, the functional inner loop against a torch.func reference, the config
section, and the recipe end to end with real processes (single, DDP, FSDP2, kill -9 + resume)."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import safe_open
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.func import functional_call

import pico.training
import recipes.maml_modules as maml_modules
from pico.config import ConfigError, load_config
from pico.model import PicoDecoder, PicoDecoderConfig
from recipes.maml_modules import (
    Episode,
    MamlConfig,
    MamlDecoder,
    MamlRunConfig,
    adapt,
    maml_scalars,
    maml_step,
    step_episodes,
)
from tests.distributed import run_distributed_test
from tests.recipes.common import launch
from tests.recipes.test_pretrain import data, losses, overrides, weights  # noqa: F401 (data: a fixture)
from tests.tiny import MODEL, SEQ, STEPS

CFG = PicoDecoderConfig(16, 1, 2, 1, 32, vocab_size=24, max_seq_len=16)
MASK = 23
MAML = MamlConfig(k_shot=2, n_way=4, inner_steps=3, inner_lr=0.5, head_layers=2, head_hidden=8)
RECIPE = "recipes/maml.py"
# The recipe tests' micro model with one more id, beyond the data's 64: the mask token.
ARGS = [*MODEL, "model.vocab_size=65", "maml.n_way=8", "maml.head_hidden=16", "maml.inner_steps=3"]


def tiny_episode():
    rows = torch.randint(0, 3, (3, 11))  # three token ids: the queries mostly hit the classes
    return rows, step_episodes([rows], dataclasses.replace(MAML, hybrid_ratio=1.0), 0, 0, 0, 24, MASK)


def test_episode_masks_support_and_query_and_keeps_only_class_labels():
    rows, (e,) = tiny_episode()
    ids, b = rows[:, :-1], torch.arange(3)[:, None]
    assert e.classes.unique().numel() == MAML.n_way and MASK not in e.classes
    assert (e.support_inputs[b, e.support_pos] == MASK).all() and (
        e.query_inputs[b[:, 0], e.query_pos] == MASK
    ).all()
    assert (e.support_inputs == MASK).sum() == 3 * MAML.k_shot and (e.query_inputs == MASK).sum() == 3
    assert (e.query_pos[:, None] != e.support_pos).all() and (e.support_pos >= 1).all()
    for labels, target, keep in (
        (ids[b, e.support_pos], e.support_target, e.support_keep),
        (ids[b[:, 0], e.query_pos], e.query_target, e.query_keep),
    ):
        assert torch.equal(keep, torch.isin(labels, e.classes))  # out-of-set labels are dropped, not class 0
        assert torch.equal(e.classes[target][keep], labels[keep])


def test_episodes_and_draws_are_deterministic_given_seed_and_step():
    rows = torch.randint(0, 20, (2, 11))
    m = MamlConfig(k_shot=2, n_way=4)
    a = step_episodes([rows] * 8, m, 3, 5, 0, 24, MASK)
    b = step_episodes([rows] * 8, m, 3, 5, 0, 24, MASK)
    assert [e is None for e in a] == [e is None for e in b] and any(e is None for e in a) and any(a)
    for x, y in zip(a, b):
        assert x is None or all(torch.equal(s, t) for s, t in zip(x, y))
    assert [e is None for e in step_episodes([rows] * 3, m, 3, 5, 0, 24, MASK)] == [e is None for e in a[:3]]
    draws = {tuple(e is None for e in step_episodes([rows] * 8, m, 3, s, 0, 24, MASK)) for s in range(6)}
    assert len(draws) > 1  # the draw changes with the step


def head_names(model):
    return [n for n, _ in model.named_parameters() if n.startswith("head.")]


def test_inner_loop_changes_only_the_head_and_restores_it():
    torch.manual_seed(0)
    model = MamlDecoder(CFG, MAML)
    _, (e,) = tiny_episode()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    support = model(e.support_inputs, episode=e)  # (B, K, C)
    base = model.head.episode_weights(e.classes)
    fast = adapt(
        model.head,
        base,
        support.detach().flatten(0, 1),
        e.support_target.flatten(),
        e.support_keep.flatten(),
        MAML.inner_steps,
        MAML.inner_lr,
    )
    assert ["head." + n for n in fast] == head_names(model)  # the fast weights are the head's alone
    assert all(not torch.equal(fast[n], base[n]) for n in fast)  # ... and they moved
    loss, _ = model(e.query_inputs, episode=e, support=support)
    loss.backward()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the head is back at its own weights
    assert all(p.grad is not None for n, p in model.named_parameters() if n != "de_embedding_proj.weight")


def test_outer_gradients_equal_a_torch_func_reference():
    torch.manual_seed(0)
    model = MamlDecoder(CFG, MAML)
    _, (e,) = tiny_episode()
    assert e.query_keep.any()
    loss, _ = model(e.query_inputs, episode=e, support=model(e.support_inputs, episode=e).detach())
    loss.backward()

    # Reference: the backbone as a function of its parameters, the head as plain matrices, first-order MAML.
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    backbone = {n: p for n, p in params.items() if not n.startswith("head.")}
    ref = PicoDecoder(CFG)
    rows = torch.arange(3)

    class Hidden(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.d = ref

        def forward(self, ids):
            return self.d.hidden(ids)

    def states(bp, ids):
        return functional_call(Hidden(), {"d." + n: p for n, p in bp.items()}, (ids,))

    def head(ws, h):
        return F.linear(F.relu(F.linear(h, ws[0])), ws[1])

    def ce(logits, target, keep):
        return F.cross_entropy(logits[keep], target[keep])

    hs = states(backbone, e.support_inputs)[rows[:, None], e.support_pos].flatten(0, 1)
    ys, ks = e.support_target.flatten(), e.support_keep.flatten()
    ws = [params["head.weights.0"], params["head.weights.1"][e.classes]]
    for _ in range(MAML.inner_steps):
        grads = torch.func.grad(lambda w: ce(head(w, hs), ys, ks))(ws)
        ws = [w - MAML.inner_lr * g for w, g in zip(ws, grads)]

    def outer(bp, fast):
        hq = states(bp, e.query_inputs)[rows, e.query_pos]
        return ce(head(fast, hq), e.query_target, e.query_keep)

    ref_loss = outer(backbone, ws)
    g_backbone, g_fast = torch.func.grad(outer, argnums=(0, 1))(backbone, ws)
    expected = dict(g_backbone)
    expected["head.weights.0"] = g_fast[0]
    expected["head.weights.1"] = torch.zeros_like(params["head.weights.1"]).index_add(0, e.classes, g_fast[1])
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=0, atol=1e-6)
    for name, p in model.named_parameters():
        if name == "de_embedding_proj.weight":
            assert p.grad is None  # a meta step does not use the next-token output layer
            continue
        torch.testing.assert_close(p.grad, expected[name], rtol=0, atol=1e-6, msg=name)


def test_next_token_branch_is_the_chunked_loss_and_equals_full_logits(monkeypatch):
    """Next-token micro-batches fuse the output layer into the loss in chunks (no (B·T, V) logits), and give
    the loss and gradients of the plain cross-entropy over the full logits."""
    torch.manual_seed(0)
    model = MamlDecoder(CFG, MAML)
    batches = [torch.randint(0, 20, (3, 11), generator=torch.Generator().manual_seed(k)) for k in range(2)]
    calls = []

    def spy(hidden, weight, labels, reduction):
        calls.append(hidden.shape)
        return pico.training.chunked_cross_entropy(hidden, weight, labels, reduction)

    monkeypatch.setattr(maml_modules, "chunked_cross_entropy", spy)
    monkeypatch.setattr(pico.training, "LOSS_CHUNK_ELEMENTS", 4 * CFG.vocab_size)  # chunks of 4 tokens
    loss, stats, _ = maml_step(model, batches, [None, None])
    assert calls == [(30, CFG.d_model)] * 2 and stats[1] == 2
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    ref = sum(
        F.cross_entropy(model(rows[:, :-1]).flatten(0, 1), rows[:, 1:].flatten()) / 2 for rows in batches
    )
    ref.backward()
    torch.testing.assert_close(loss, ref.detach(), rtol=0, atol=1e-6)
    assert got.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for name, g in got.items():
        torch.testing.assert_close(g, model.get_parameter(name).grad, rtol=0, atol=1e-6, msg=name)


def hand_made_episode(classes):
    """Two sequences, support positions 1, 2, 3 and one query each; labels as class indices, by hand."""
    # (B, T) = (2, 8): support labels 1 2 1 | 2 2 7
    ids = torch.tensor([[9, 1, 2, 1, 3, 4, 5, 6], [9, 2, 2, 7, 3, 8, 1, 6]])
    support_pos, query_pos = torch.tensor([[1, 2, 3], [1, 2, 3]]), torch.tensor([4, 5])  # queries: 3 | 8
    classes = torch.tensor(classes)
    support_labels, query_labels = ids.gather(1, support_pos), ids.gather(1, query_pos[:, None])[:, 0]
    index = {int(c): i for i, c in enumerate(classes)}
    return Episode(
        ids.scatter(1, support_pos, MASK),
        support_pos,
        torch.tensor([[index.get(int(t), 0) for t in row] for row in support_labels]),
        torch.tensor([[int(t) in index for t in row] for row in support_labels]),
        ids.scatter(1, query_pos[:, None], MASK),
        query_pos,
        torch.tensor([index.get(int(t), 0) for t in query_labels]),
        torch.tensor([int(t) in index for t in query_labels]),
        classes,
    )


def test_episode_statistics_are_counted_and_logged():
    """Two hand-made episodes, counted by hand: classes [1, 2, 7, 5] get 2, 3, 1 and 0 support examples and
    neither query (3, 8) is a class; classes [1, 2, 3, 8] get 2, 3, 0, 0 (the 7 is dropped) and keep both."""
    first, second = hand_made_episode([1, 2, 7, 5]), hand_made_episode([1, 2, 3, 8])
    assert first.counts().tolist() == [
        6,
        2,
        4,
        1,
        1,
        1,
    ]  # items, queries, classes, no shot, one shot, no query
    assert second.counts().tolist() == [6, 2, 4, 2, 0, 0]
    torch.manual_seed(0)
    model = MamlDecoder(PicoDecoderConfig(16, 1, 2, 1, 32, vocab_size=24, max_seq_len=16), MAML)
    rows = torch.zeros(2, 9, dtype=torch.long)  # unused by meta micro-batches but for their count
    _, stats, _ = maml_step(model, [rows, rows, rows], [first, None, second])
    scalars = maml_scalars(stats)
    expected = {
        "maml/meta_micro_batches": 2,
        "maml/lm_micro_batches": 1,
        "maml/queries_kept": 2 / 4,
        "maml/support_kept": 11 / 12,
        "maml/shots_per_class": 11 / 8,
        "maml/classes_no_support": 3 / 8,
        "maml/classes_one_shot": 1 / 8,
        "maml/meta_micro_batches_no_query": 1,
    }
    assert {k: scalars[k] for k in expected} == pytest.approx(expected, rel=1e-6)
    assert "maml/queries_kept" not in maml_scalars(
        maml_step(model, [rows], [None])[1]
    )  # no meta: no episodes


def test_episode_counts_equal_a_count_over_the_rows():
    """Drawn episodes of a batch with few token ids, counted again from the rows with plain Python."""
    rows = torch.randint(0, 6, (4, 13), generator=torch.Generator().manual_seed(1))
    m = dataclasses.replace(MAML, hybrid_ratio=1.0, k_shot=3, n_way=5)
    for step in range(5):
        (e,) = step_episodes([rows], m, 0, step, 0, 24, MASK)
        classes = e.classes.tolist()
        support = [int(rows[b, p]) for b in range(4) for p in e.support_pos[b].tolist()]
        queries = [int(rows[b, e.query_pos[b]]) for b in range(4)]
        shots = [sum(label == c for label in support) for c in classes]
        expected = [len(support), len(queries), len(classes), shots.count(0), shots.count(1)]
        expected.append(not any(q in classes for q in queries))
        assert e.counts().tolist() == expected, step


def _branches_on_every_rank():
    rank = dist.get_rank()
    batches = [
        torch.randint(0, 20, (2, 11), generator=torch.Generator().manual_seed(rank * 10 + k))
        for k in range(6)
    ]  # each rank its own rows
    m = MamlConfig(k_shot=2, n_way=4)
    for step in range(4):
        mine = [e is None for e in step_episodes(batches, m, 7, step, rank, 24, MASK)]
        every = [None, None]
        dist.all_gather_object(every, mine)
        assert every[0] == every[1], (step, every)
    torch.manual_seed(rank)  # and a whole step: both ranks take the same branches, as DDP requires
    model = torch.nn.parallel.DistributedDataParallel(MamlDecoder(CFG, MAML), find_unused_parameters=True)
    episodes = step_episodes(batches[:4], m, 7, 0, rank, 24, MASK)
    loss, stats, _ = maml_step(model, batches[:4], episodes)
    assert torch.isfinite(loss) and stats[0] + stats[1] == 8  # micro-batch counts summed over both ranks


def test_meta_choice_matches_on_every_rank():
    run_distributed_test(_branches_on_every_rank, world_size=2)


@pytest.mark.parametrize(
    "override, message",
    [
        ("maml.k_shott=4", "maml.k_shott: unknown key"),
        ("maml.hybrid_ratio=1.5", "maml.hybrid_ratio: must be in [0, 1]"),
        ("maml.n_way=0", "maml.n_way: must be positive"),
    ],
)
def test_maml_section_is_strictly_validated(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(None, [override], cls=MamlRunConfig)


# End to end: the recipe's micro model and random shards (tests/tiny.py).


@pytest.fixture(scope="module")
def mixed(data, tmp_path_factory):  # noqa: F811
    run_dir = tmp_path_factory.mktemp("mixed") / "run"
    launch(overrides(data, run_dir, *ARGS), recipe=RECIPE)
    return run_dir


@pytest.fixture(scope="module")
def meta_only(data, tmp_path_factory):  # noqa: F811
    run_dir = tmp_path_factory.mktemp("meta") / "run"
    launch(overrides(data, run_dir, *ARGS, "maml.hybrid_ratio=1"), recipe=RECIPE)
    return run_dir


def test_run_logs_branches_and_meta_losses_and_exports_without_the_head(mixed):
    loss, acc = losses(mixed)
    assert sorted(loss) == list(range(1, STEPS + 1)) and all(np.isfinite(list(loss.values())))
    counts = [
        (m.value, n.value)
        for m, n in zip(acc.Scalars("maml/meta_micro_batches"), acc.Scalars("maml/lm_micro_batches"))
    ]
    assert all(m + n == 4 for m, n in counts) and sum(m for m, _ in counts) not in (0, 4 * STEPS)
    for tag in ("support_loss", "support_accuracy", "query_loss", "query_accuracy"):
        assert all(np.isfinite(e.value) for e in acc.Scalars(f"maml/{tag}"))
    assert any(e.value < np.log(8) for e in acc.Scalars("maml/support_loss"))  # the inner loop adapted
    for tag in ("queries_kept", "support_kept", "classes_no_support", "classes_one_shot"):
        assert all(0 <= e.value <= 1 for e in acc.Scalars(f"maml/{tag}")) and acc.Scalars(f"maml/{tag}")
    assert all(0 < e.value <= 2 for e in acc.Scalars("maml/shots_per_class"))  # B·K items over N classes
    assert all(e.value in (0, 1, 2, 3, 4) for e in acc.Scalars("maml/meta_micro_batches_no_query"))
    with safe_open(mixed / "checkpoints" / "step_6" / "model" / "model.safetensors", "pt") as f:
        assert not any(k.startswith("head.") for k in f.keys())
    transformers = pytest.importorskip("transformers")
    path = mixed / "checkpoints" / f"step_{STEPS}" / "model"
    hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    ours = PicoDecoder.from_pretrained(path).eval()
    ids = torch.randint(0, 64, (2, SEQ))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=0, atol=1e-4)
    assert (mixed / "checkpoints" / "step_3" / "learning_dynamics" / "train.safetensors").is_file()


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_match_one_process(meta_only, data, tmp_path, strategy):  # noqa: F811
    """Meta steps only: every layout then makes the same episodes of the same rows (the meta/LM pattern of a
    mixed step depends on the micro-batches per rank; docs/case_studies.md)."""
    run_dir = tmp_path / "run"
    launch(
        overrides(data, run_dir, *ARGS, "maml.hybrid_ratio=1", f"training.strategy={strategy}"),
        nproc=2,
        recipe=RECIPE,
    )
    ref, _ = losses(meta_only)
    got, _ = losses(run_dir)
    assert sorted(got) == sorted(ref)
    for step in ref:
        assert abs(got[step] - ref[step]) <= 1e-5, (step, got[step], ref[step])
    for name, w in weights(meta_only).items():
        torch.testing.assert_close(weights(run_dir)[name], w, rtol=0, atol=1e-5)


def test_ddp_and_fsdp_agree_on_mixed_steps(data, tmp_path):  # noqa: F811
    """Meta and next-token micro-batches accumulated in one step: DDP (unused parameters) equals FSDP2."""
    runs = {}
    for strategy in ("ddp", "fsdp"):
        runs[strategy] = tmp_path / strategy
        launch(
            overrides(
                data,
                runs[strategy],
                *ARGS,
                f"training.strategy={strategy}",
                "learning_dynamics.enabled=false",
                "evaluation.data=null",
            ),
            nproc=2,
            recipe=RECIPE,
        )
    a, acc = losses(runs["ddp"])
    b, _ = losses(runs["fsdp"])
    assert {e.value for e in acc.Scalars("maml/meta_micro_batches")} >= {2.0}  # some steps mix the branches
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-5, (step, a[step], b[step])


def test_kill_and_resume_across_a_meta_step_is_bitwise(mixed, data, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    args = overrides(data, run_dir, *ARGS)
    killed = launch(args, check=False, kill_at="3:done", recipe=RECIPE)
    assert killed.returncode != 0 and (run_dir / "checkpoints" / "latest").read_text().strip() == "step_3"
    assert "resumed from" in launch(args, recipe=RECIPE).stdout
    _, acc = losses(mixed)
    assert (
        sum(e.value for e in acc.Scalars("maml/meta_micro_batches") if e.step > 3) > 0
    )  # meta steps after 3
    for name, w in weights(mixed).items():
        assert torch.equal(weights(run_dir)[name], w), name
    heads = []
    for run in (mixed, run_dir):  # the head, which the export leaves out, is in state/ and resumed too
        dcp_to_torch_save(run / "checkpoints" / "step_6" / "state", tmp_path / "state.pt")
        model = torch.load(tmp_path / "state.pt", weights_only=False)["model"]
        heads.append({k: v for k, v in model.items() if k.startswith("head.")})
    assert heads[0].keys() == {f"head.weights.{i}" for i in range(4)}  # maml.head_layers: 4
    assert all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0])
