"""TokenStream: a fixed global sample order, split into rank slices and micro-batches, resumable,
prefetched."""

import atexit
import queue
import threading
import time
import weakref
from collections.abc import Iterator

import numpy as np
import torch

from pico.data.shards import DataError, RowGroupReader, ShardIndex, build_index
from pico.errors import ConfigError

_LIVE_STREAMS: "weakref.WeakSet[TokenStream]" = weakref.WeakSet()


class SampleOrder:
    """Maps (epoch, sample) to (row group, row): file order, or a seeded block shuffle reseeded
    every epoch."""

    def __init__(self, index: ShardIndex, shuffle_seed: int | None = None):
        self.index, self.seed = index, shuffle_seed
        # (epoch, row group order, their starts)
        self._blocks: tuple[int, np.ndarray, np.ndarray] | None = None
        self._rows: tuple[int, int, np.ndarray] | None = None  # (epoch, row group, row permutation)

    def locate(self, epoch: int, i: int) -> tuple[int, int]:
        """Row group and row inside it of sample `i` (0 ≤ i < num_samples) of epoch `epoch`."""
        if self.seed is None:
            g = int(np.searchsorted(self.index.rg_start, i, side="right")) - 1
            return g, i - int(self.index.rg_start[g])
        if self._blocks is None or self._blocks[0] != epoch:
            order = np.random.default_rng(self.seed + epoch).permutation(len(self.index.rg_rows))
            starts = np.concatenate([[0], np.cumsum(self.index.rg_rows[order])[:-1]])
            self._blocks = (epoch, order, starts)
        _, order, starts = self._blocks
        j = int(np.searchsorted(starts, i, side="right")) - 1
        g = int(order[j])
        if self._rows is None or self._rows[:2] != (epoch, g):
            perm = np.random.default_rng([self.seed + epoch, g]).permutation(int(self.index.rg_rows[g]))
            self._rows = (epoch, g, perm)
        return g, int(self._rows[2][i - int(starts[j])])

    def position(self, epoch: int, group: int, row: int) -> int:
        """The sample number in epoch `epoch` of row `row` of row group `group`: the inverse of `locate`."""
        if self.seed is None:
            return int(self.index.rg_start[group]) + row
        order = np.random.default_rng(self.seed + epoch).permutation(len(self.index.rg_rows))
        j = int(np.flatnonzero(order == group)[0])
        start = int(self.index.rg_rows[order[:j]].sum())
        perm = np.random.default_rng([self.seed + epoch, group]).permutation(int(self.index.rg_rows[group]))
        return start + int(np.flatnonzero(perm == row)[0])


def read_samples(order: SampleOrder, reader: RowGroupReader, start: int, stop: int) -> torch.Tensor:
    """Global samples [start, stop) of `order`, counted across epochs, as int64 rows (stop - start, T + 1)."""
    rows = []
    for g in range(start, stop):
        epoch, i = divmod(g, order.index.num_samples)
        group, row = order.locate(epoch, i)
        rows.append(reader.read(group)[row])
    return torch.from_numpy(np.stack(rows).astype(np.int64))  # (stop - start, seq_len + 1)


def split_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows (B, T+1) -> (inputs, labels), each (B, T): the one place rows become next-token pairs."""
    return rows[:, :-1], rows[:, 1:]


class TokenStream:
    """Micro-batches of token rows `(micro_batch_size, seq_len + 1)`: this rank's slice of each global batch,
    read ahead on a thread. `split_rows` turns a micro-batch into (inputs, labels).

    Global batch s is samples [s·B, (s+1)·B) of the fixed order; rank r owns [s·B + r·B/W, s·B + (r+1)·B/W),
    cut into B/(micro_batch_size·W) consecutive micro-batches. `allow_changed`: a saved position restores on
    data of another size (`load_state_dict`).
    """

    def __init__(
        self,
        path: str,
        seq_len: int,
        batch_size: int,
        micro_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        vocab_size: int | None = None,
        shuffle_seed: int | None = None,
        wrap: bool = False,
        prefetch: int = 2,
        device: str | torch.device = "cpu",
        *,
        allow_changed: bool = False,
    ):
        if min(seq_len, batch_size, micro_batch_size, world_size) < 1 or not 0 <= rank < world_size:
            raise ConfigError(
                f"data: need seq_len, batch_size, micro_batch_size, world_size ≥ 1 "
                f"and 0 ≤ rank < world_size, got "
                f"{seq_len=}, {batch_size=}, {micro_batch_size=}, {world_size=}, {rank=}"
            )
        if batch_size % (micro_batch_size * world_size):
            raise ConfigError(
                f"data.batch_size={batch_size} must be a multiple of "
                f"data.micro_batch_size={micro_batch_size} "
                f"× world size {world_size}"
            )
        if prefetch < 0:
            raise ConfigError(f"data.prefetch: must be ≥ 0, got {prefetch}")
        self.path, self.seq_len, self.vocab_size = str(path), seq_len, vocab_size
        self.batch_size, self.micro_batch_size = batch_size, micro_batch_size
        self.rank, self.world_size = rank, world_size
        self.shuffle_seed, self.wrap, self.prefetch, self.device = (
            shuffle_seed,
            wrap,
            prefetch,
            torch.device(device),
        )
        self.accumulation_steps = batch_size // (micro_batch_size * world_size)
        self.allow_changed = allow_changed
        self.index = build_index(self.path)
        self.num_samples = self.index.num_samples
        self._order = SampleOrder(self.index, shuffle_seed)
        self._reader = RowGroupReader(self.index, seq_len + 1, vocab_size)
        self._consumed = 0  # micro-batches handed to the caller
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop: threading.Event | None = None
        _LIVE_STREAMS.add(self)

    @classmethod
    def from_config(cls, data, rank: int, world_size: int, vocab_size: int, device) -> "TokenStream":
        """The stream a `data:` config section describes (pico.config.DataConfig), for one rank."""
        return cls(
            data.path,
            data.seq_len,
            data.batch_size,
            data.micro_batch_size,
            rank,
            world_size,
            vocab_size,
            data.shuffle_seed,
            data.wrap,
            data.prefetch,
            device,
            allow_changed=data.allow_changed,
        )

    @property
    def row_groups_read(self) -> int:
        """Row groups decoded so far by this rank (read-ahead included)."""
        return self._reader.row_groups_read

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        rows = self._read(self._consumed) if self.prefetch == 0 else self._take()
        self._consumed += 1
        if self.device.type != "cpu":
            rows = rows.to(self.device, non_blocking=True)
        return rows  # (mb, seq_len + 1)

    def has_batch(self, s: int) -> bool:
        """True when global batch `s` exists: within the data, or always with wrap=True."""
        return self.wrap or (s + 1) * self.batch_size <= self.num_samples

    def next_batch(self) -> list[torch.Tensor]:
        """This rank's micro-batches `(micro_batch_size, seq_len + 1)` of the next global batch."""
        return [next(self) for _ in range(self.accumulation_steps)]

    def global_batch(self, s: int) -> torch.Tensor:
        """Global batch `s` whole, as int64 CPU rows (batch_size, seq_len + 1): what all ranks' micro-batches
        of step `s` hold together, read at once without moving the stream's position (the read-ahead, which
        shares the reader, stops and restarts at the next micro-batch)."""
        self._require(s)
        self._stop_thread()
        return read_samples(self._order, self._reader, s * self.batch_size, (s + 1) * self.batch_size)

    def batch_rows(self, s: int) -> list[tuple[int, int]]:
        """(file number in `index.files`, row of the file) of each sequence of global batch `s`, in batch
        order: where its rows come from, without reading them."""
        self._require(s)
        rows = []
        for g in range(s * self.batch_size, (s + 1) * self.batch_size):
            group, row = self._order.locate(*divmod(g, self.num_samples))
            rows.append((int(self.index.rg_file[group]), int(self.index.rg_file_row[group]) + row))
        return rows

    def batches_holding(self, group: int, row: int, steps: int) -> list[tuple[int, int]]:
        """(s, j) for every global batch s < `steps` whose row j is row `row` of row group `group`: one
        per epoch that reaches it (only the first epoch without wrap)."""
        B, n = self.batch_size, self.num_samples
        last = steps if self.wrap else min(steps, n // B)  # the batches that exist
        found = []
        for epoch in range(-(-last * B // n)):
            g = epoch * n + self._order.position(epoch, group, row)
            if g < last * B:
                found.append(divmod(g, B))
        return found

    def state_dict(self) -> dict:
        """Position after the micro-batches consumed so far, in global samples
        (world-size free at batch ends)."""
        s, k = divmod(self._consumed, self.accumulation_steps)
        samples = s * self.batch_size + k * self.micro_batch_size * self.world_size
        return {
            "samples": samples,
            "epoch": samples // self.num_samples,
            "num_samples": self.num_samples,
            "shuffle_seed": self.shuffle_seed,
            "batch_size": self.batch_size,
            "micro_batch_size": self.micro_batch_size,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue after the saved position; any world size / micro-batch size if saved at a
        global-batch end. The position is a count of global samples: on data of another size
        (`allow_changed`) the next batch is the same-numbered batch of the new data's order."""
        if state["num_samples"] != self.num_samples and not self.allow_changed:
            raise DataError(
                f"{self.path}: data state was saved on {state['num_samples']} samples, the data now has "
                f"{self.num_samples} (data.allow_changed=true continues on it)"
            )
        if state["shuffle_seed"] != self.shuffle_seed:
            raise ConfigError(
                f"data.shuffle_seed: the data state was saved with {state['shuffle_seed']}, "
                f"this run has {self.shuffle_seed}"
            )
        samples = state["samples"]
        if samples % self.batch_size == 0:
            consumed = samples // self.batch_size * self.accumulation_steps
        elif all(state[k] == getattr(self, k) for k in ("batch_size", "micro_batch_size", "world_size")):
            s, rest = divmod(samples, self.batch_size)
            consumed = s * self.accumulation_steps + rest // (self.micro_batch_size * self.world_size)
        else:
            raise ConfigError(
                f"data.batch_size: the data state at sample {samples} is inside a global batch of "
                f"{state['batch_size']} "
                f"(micro_batch_size={state['micro_batch_size']}, world size {state['world_size']}); "
                f"it restores "
                f"only with the same settings, not batch_size={self.batch_size}, "
                f"micro_batch_size={self.micro_batch_size}, world size {self.world_size}"
            )
        self._stop_thread()
        self._consumed = consumed

    def close(self) -> None:
        """Stop the prefetch thread and close open files."""
        if self._stop_thread():
            self._reader.close()

    def __enter__(self) -> "TokenStream":  # noqa: PYI034 (typing.Self needs Python 3.11; pico supports 3.10)
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_reader", None) is not None:
            self.close()

    def _require(self, s: int) -> None:
        """Raise the end-of-data DataError when global batch `s` does not exist."""
        if not self.has_batch(s):
            B, n = self.batch_size, self.num_samples
            raise DataError(
                f"{self.path}: end of data: it has {n} samples, global batch {s} asks for samples "
                f"[{s * B}, {(s + 1) * B}); use more data or wrap=True"
            )

    def _read(self, m: int) -> torch.Tensor:
        """Micro-batch number `m` of this rank, as int64 CPU token rows (pinned for CUDA)."""
        s, k = divmod(m, self.accumulation_steps)
        self._require(s)
        start = (
            s * self.batch_size + self.rank * (self.batch_size // self.world_size) + k * self.micro_batch_size
        )
        ids = read_samples(self._order, self._reader, start, start + self.micro_batch_size)  # (mb, T + 1)
        return ids.pin_memory() if self.device.type == "cuda" else ids

    def _take(self) -> torch.Tensor:
        if self._thread is None:
            self._queue, self._stop = queue.Queue(maxsize=self.prefetch), threading.Event()
            self._thread = threading.Thread(
                target=_prefetch,
                args=(weakref.ref(self), self._consumed, self._queue, self._stop),
                daemon=True,
                name="pico-data-prefetch",
            )
            self._thread.start()
        while True:
            alive = self._thread.is_alive()  # before get(): a thread dead by then has put all it ever will
            try:
                item = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not alive:
                    raise RuntimeError(f"{self.path}: data prefetch thread exited") from None
        if isinstance(item, BaseException):
            self._stop_thread()
            raise item
        return item

    def _stop_thread(self, timeout: float = 30.0) -> bool:
        """Stop and join the prefetch thread, dropping what it read ahead; False if it did not stop
        in time."""
        if self._thread is None:
            return True
        self._stop.set()
        deadline = time.monotonic() + timeout
        while True:
            # Make room, so a producer blocked in put() wakes up and sees `stop`.
            while not self._queue.empty():
                self._queue.get_nowait()
            # Dropped by its own prefetch thread, which now exits.
            if self._thread is threading.current_thread():
                return False
            self._thread.join(0.01)
            if not self._thread.is_alive() or time.monotonic() > deadline:
                break
        if self._thread.is_alive():
            return False
        self._thread = self._queue = self._stop = None
        return True


def _prefetch(ref: "weakref.ref[TokenStream]", m: int, out: queue.Queue, stop: threading.Event) -> None:
    """Prefetch thread: read micro-batches from number `m` on until stopped, the stream is dropped,
    or an error."""
    while not stop.is_set():
        stream = ref()
        if stream is None:
            return
        try:
            item = stream._read(m)
        except BaseException as e:  # noqa: BLE001 (handed to the consumer, raised at the micro-batch that failed)
            item = e
        del stream  # hold no reference while waiting, so a dropped stream is collected and closed
        out.put(item)  # blocks while `prefetch` items wait; close() drains the queue to unblock it
        if isinstance(item, BaseException):
            return
        m += 1


@atexit.register
def _close_live_streams() -> None:
    for stream in list(_LIVE_STREAMS):
        stream._stop_thread(timeout=5.0)


def read_batch(path: str, n: int, seq_len: int, vocab_size: int | None = None) -> torch.Tensor:
    """The first `n` rows of `path` in file order as an int64 tensor (n, seq_len + 1), e.g. a fixed
    eval batch."""
    if n < 1:
        raise ValueError(f"read_batch: n must be ≥ 1, got {n}")
    index = build_index(path)
    if index.num_samples < n:
        raise DataError(f"{path}: asked for {n} rows, the data has {index.num_samples}")
    reader, rows, have = RowGroupReader(index, seq_len + 1, vocab_size), [], 0
    for g in range(len(index.rg_rows)):
        if have == n:
            break
        rows.append(reader.read(g)[: n - have])
        have += len(rows[-1])
    reader.close()
    return torch.from_numpy(np.concatenate(rows).astype(np.int64))


def iter_eval_batches(
    path: str,
    seq_len: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    max_batches: int | None = None,
    vocab_size: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Disjoint per-rank `(inputs, labels)` batches of `batch_size` rows, ⌊N / (batch_size·W)⌋ on every rank.

    Every rank yields the same number of batches; global batch s is rows [s·b·W, (s+1)·b·W) in file
    order and rank r takes rows [s·b·W + r·b, s·b·W + (r+1)·b). The remainder of fewer than b·W rows
    is not evaluated.
    """
    stream = TokenStream(
        path, seq_len, batch_size * world_size, batch_size, rank, world_size, vocab_size, prefetch=0
    )
    batches = stream.num_samples // (batch_size * world_size)
    if max_batches is not None:
        batches = min(batches, max_batches)
    try:
        for _ in range(batches):
            yield split_rows(next(stream))
    finally:
        stream.close()
