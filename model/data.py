"""Training data from built shards: decode -> pick a conversation -> image -> tokens -> batches.

One sample becomes one training example:
1. Pick one of the record's conversations whose task the stage trains (`STAGE_TASKS`): stage 1
   (spatial pretraining) uses region_to_3d, point_3d and grounded_cot; stage 2 (detection CoT) uses
   detect_3d and grounded_cot. The pick is seeded by (seed, epoch, key), so it does not depend on which
   worker or rank reads the sample, and a new epoch may pick another conversation.
2. The image becomes encoder inputs by the model's image policy (`model.imaging`: letterbox, stretch,
   focal canvas or NVILA tiles) from s = record camera.scale = 1000/fx (None when the camera is unknown, as
   for cot); the content windows go with it, so PE and region pooling work in original-image coordinates
   like the grammar's boxes. With tiles the image has several canvases and `image_grids` says how many.
3. `encode_conversation` applies the chat template: grammar tokens are single ids, labels cover the
   assistant turns only, and every `<region>` yields its box (detached when in an assistant turn).
   A conversation longer than `max_seq_len` loses its last rounds; one whose first round does not fit
   is skipped (and counted). Options (`model.augment`): detect_3d answers without their grounded 2D
   prefix (`det3d_answer="direct"`), and 2D jitter of the region-prompt boxes (`box_jitter`, training only).

Corpora are mixed by weight (`det3d@0.5,pointmap@0.3,cot@0.2`): each (rank, DataLoader worker) reads its
split of every corpus through `shards.reader.make_webdataset` and interleaves them with a weighted draw
seeded by (seed, epoch, rank, worker). Deterministic path (not resampled): shards are split by rank then
worker, so over one epoch a rank sees each sample at most once; a corpus that runs out leaves the draw,
and the epoch ends when all have. Resampled path: every corpus is an endless seeded stream and an epoch
is `samples_per_epoch` per rank (multi-node, mixture ratios held exactly).

Workers assemble whole batches. `TrainLoader` takes them in a fixed round-robin over workers (buffering
any that arrive early), never in arrival order, and records per worker how far its stream was read. That
position is exact whatever gets filtered, and on resume every worker skips precisely that many raw
samples and the round-robin restarts at the right worker: a resumed run sees the very batches an
uninterrupted one would (the trainer's resume test checks the final weights bit for bit).
"""

from __future__ import annotations

import io
import json
import random
from collections import Counter, deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.utils.data

__all__ = ["STAGE_TASKS", "Source", "parse_mix", "ExampleSpec", "Example", "pick_conversation", "fit_conversation",
           "build_example", "collate_examples", "mixed_stream", "ShardBatches", "TrainLoader"]

STAGE_TASKS: dict[int, tuple[str, ...]] = {
    1: ("region_to_3d", "point_3d", "grounded_cot"),
    2: ("detect_3d", "grounded_cot"),
}
"""Conversation tasks each training stage learns from (paper supp. Table 10, restricted to our corpora)."""

IMAGE_EXTS = ("jpg", "png", "jpeg")


# ---------------------------------------------------------------------------------------------- sources

@dataclass(frozen=True)
class Source:
    """One corpus build in the mixture: its completed shards and their sample count."""

    name: str
    path: str
    weight: float
    urls: tuple[str, ...]
    n_samples: int


def _completed_shards(build: Path) -> tuple[list[str], int]:
    """Tars of the finished chunks (`shards.layout.is_done`: the stats file, written last) and their sample total."""
    from shards.layout import BuildLayout
    from shards.reader import shard_urls

    layout = BuildLayout(build)
    shard_urls(build)  # a clear error when `build` is not a build directory
    urls, n = [], 0
    for i in layout.done_shards():
        urls.append(str(layout.tar(i)))
        n += int(json.loads(layout.stats(i).read_text())["n_samples"])
    return urls, n


def parse_mix(mix: str, root: str | Path = ".") -> list[Source]:
    """`NAME@RATIO,...` -> Sources. NAME is `root/NAME`, or a path when it contains '/'. RATIO defaults to 1."""
    out: list[Source] = []
    for item in (s.strip() for s in mix.split(",")):
        if not item:
            continue
        name, _, ratio = item.rpartition("@") if "@" in item else (item, "", "1")
        try:
            weight = float(ratio)
        except ValueError:
            raise ValueError(f"bad mixture item {item!r}: ratio {ratio!r} is not a number") from None
        if not weight > 0:
            raise ValueError(f"bad mixture item {item!r}: ratio must be > 0")
        path = Path(name) if "/" in name else Path(root) / name
        if not path.is_dir():
            raise FileNotFoundError(f"mixture item {item!r}: build directory {path} does not exist")
        urls, n = _completed_shards(path)
        if not urls:
            raise FileNotFoundError(f"mixture item {item!r}: no completed shards under {path}/shards")
        out.append(Source(path.name if "/" in name else name, str(path), weight, tuple(urls), n))
    if not out:
        raise ValueError(f"empty data mixture {mix!r}")
    if len({s.name for s in out}) != len(out):
        raise ValueError(f"corpus named twice in mixture {mix!r}")
    return out


# ---------------------------------------------------------------------------------------------- one example

@dataclass
class ExampleSpec:
    """Everything a worker needs to turn a decoded sample into tensors (picklable: sent to workers)."""

    tokenizer: Any
    stage: int
    num_image_tokens: int
    image_size: int
    pad_id: int
    max_seq_len: int = 2048
    seed: int = 0
    mode: str = "letterbox"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    tasks: tuple[str, ...] | None = None
    """Tasks to train on instead of the stage's (`STAGE_TASKS`)."""
    blind: bool = False
    """Every image becomes the mean colour and depth is dropped (the blind baseline)."""
    canvas_focal: float = 0.0
    min_tiles: int = 1
    max_tiles: int = 12
    box_jitter: float = 0.0
    """Region-prompt boxes move by up to this fraction of their size (`model.augment.jitter_boxes`); 0 = off."""
    det3d_answer: str = "grounded"
    """grounded | direct: detect_3d answers keep or drop each object's `<bbox>..</bbox><region> ` prefix."""

    @property
    def policy(self) -> Any:
        """The `model.imaging.ImagePolicy` these fields describe."""
        from model.imaging import ImagePolicy

        return ImagePolicy(self.mode, self.image_size, self.mean, self.std, self.canvas_focal, self.min_tiles,
                           self.max_tiles, self.num_image_tokens)

    @classmethod
    def for_model(cls, model: Any, stage: int, max_seq_len: int = 2048, seed: int = 0,
                  mode: str | None = None, tasks: Sequence[str] | None = None, blind: bool = False,
                  box_jitter: float = 0.0, det3d_answer: str | None = None) -> ExampleSpec:
        """The model's own image policy and answer form (its config) unless `mode` / `det3d_answer` are given."""
        c = model.config
        return cls(model.tokenizer, stage, c.num_image_tokens, c.image_size, c.token_ids["pad"], max_seq_len, seed,
                   mode or c.image_mode, tuple(c.image_mean), tuple(c.image_std), tuple(tasks) if tasks else None,
                   blind, float(c.canvas_focal), int(c.min_tiles), int(c.max_tiles), box_jitter,
                   det3d_answer or c.det3d_answer)

    @classmethod
    def for_config(cls, model: Any, cfg: Any) -> ExampleSpec:
        """The spec a `TrainConfig` asks for (stage, sequence length, seed, image policy, tasks, blind, options).

        The image policy is the model config's, which `model.build.build_model` set from `cfg.model`."""
        return cls.for_model(model, cfg.stage, cfg.data.max_seq_len, cfg.seed, cfg.model.image_mode,
                             tasks=cfg.data.task_list, blind=cfg.data.blind, box_jitter=cfg.data.box_jitter,
                             det3d_answer=cfg.data.det3d_answer)


@dataclass
class Example:
    key: str
    corpus: str
    task: str
    encoded: Any
    """model.tokenizer.EncodedConversation."""
    pixel_values: Any
    """(3, S, S) float tensor; (T, 3, S, S) in the tiles mode."""
    window: Any
    """(x0, y0, x1, y1); in the tiles mode a list of T windows."""
    depth: Any = None
    """(1, S, S) depth canvas or None; (T, 1, S, S) in the tiles mode."""
    grid: tuple[int, int] | None = None
    """Tile grid (rows, cols) in the tiles mode, else None."""


def pick_conversation(record: Mapping[str, Any], stage: int, seed: int, epoch: int,
                      tasks: Sequence[str] | None = None) -> dict[str, Any] | None:
    """One conversation of a task the stage trains (or of `tasks`), chosen by (seed, epoch, key); None if none."""
    tasks = tuple(tasks) if tasks else STAGE_TASKS[stage]
    eligible = [c for c in record.get("conversations", []) if c.get("task") in tasks]
    if not eligible:
        return None
    rng = random.Random(f"gr3d-conv:{seed}:{epoch}:{record['key']}")
    return eligible[rng.randrange(len(eligible))]


def _rounds(turns: Sequence[Mapping[str, str]]) -> list[list[Mapping[str, str]]]:
    """Split turns into rounds, each starting at a human/user turn."""
    rounds: list[list[Mapping[str, str]]] = []
    for t in turns:
        if t.get("from", t.get("role")) in ("human", "user") or not rounds:
            rounds.append([t])
        else:
            rounds[-1].append(t)
    return rounds


def fit_conversation(tokenizer: Any, turns: Sequence[Mapping[str, str]], num_image_tokens: int | Sequence[int],
                     max_seq_len: int) -> Any:
    """Encode the conversation, dropping trailing rounds until it fits; None if one round is too long.

    `num_image_tokens`: per-tile counts in the tiles mode (`model.tokenizer.encode_conversation`)."""
    from model.tokenizer import encode_conversation

    rounds = _rounds(turns)
    for k in range(len(rounds), 0, -1):
        enc = encode_conversation(tokenizer, [t for r in rounds[:k] for t in r], num_image_tokens)
        if len(enc.input_ids) <= max_seq_len:
            return enc
    return None


def _image_bytes(sample: Mapping[str, Any]) -> bytes:
    for ext in IMAGE_EXTS:
        if ext in sample:
            return sample[ext]
    raise KeyError(f"sample {sample.get('__key__')} has no image member ({', '.join(IMAGE_EXTS)})")


def build_example(sample: Mapping[str, Any], spec: ExampleSpec, epoch: int) -> tuple[Example | None, str | None]:
    """A decoded shard sample -> (Example, None), or (None, reason) when the stage cannot use it."""
    from PIL import Image

    from model.augment import direct_turns, jitter_boxes

    rec = sample["json"]
    conv = pick_conversation(rec, spec.stage, spec.seed, epoch, spec.tasks)
    if conv is None:
        return None, "no_stage_task"
    turns = conv["turns"]
    if spec.det3d_answer == "direct" and conv["task"] == "detect_3d":
        turns = direct_turns(turns)
    camera = rec.get("camera")
    scale = float(camera["scale"]) if camera else None
    policy = spec.policy
    tiled = spec.mode == "tiles"
    with Image.open(io.BytesIO(_image_bytes(sample))) as im:
        counts = policy.token_counts(im.width, im.height, scale) if tiled else spec.num_image_tokens
        enc = fit_conversation(spec.tokenizer, turns, counts, spec.max_seq_len)
        if enc is None:
            return None, "too_long"
        prep = policy.prepare(im, scale, sample.get("depth.npy"))
    if spec.box_jitter > 0:
        enc.region_boxes = jitter_boxes(enc.region_boxes, enc.region_in_response, spec.box_jitter,
                                        f"{spec.seed}:{epoch}:{rec['key']}")
    pix, dcan = prep.pixels, prep.depth
    if spec.blind:  # normalized zero = the mean colour everywhere; no depth either (it would show the scene)
        pix, dcan = torch.zeros_like(pix), None
    if tiled:
        return Example(rec["key"], rec["corpus"], conv["task"], enc, pix, prep.windows, dcan, prep.grid), None
    return Example(rec["key"], rec["corpus"], conv["task"], enc, pix[0], prep.windows[0],
                   dcan[0] if dcan is not None else None), None


def collate_examples(examples: Sequence[Example], pad_id: int) -> dict[str, Any]:
    """Right-padded forward() kwargs (`model.gr3d.collate_conversations`) + images, windows, depth, meta."""
    from model.gr3d import collate_conversations

    batch = collate_conversations([e.encoded for e in examples], pad_id)
    if any(e.grid is not None for e in examples):  # tiles: every image's canvases, in order
        batch["pixel_values"] = torch.cat([e.pixel_values for e in examples])
        batch["image_windows"] = torch.tensor([w for e in examples for w in e.window], dtype=torch.float32)
        batch["image_grids"] = [e.grid for e in examples]
        if any(e.depth is not None for e in examples):
            batch["depth"] = torch.cat([e.depth if e.depth is not None else torch.zeros(e.pixel_values.shape[0], 1,
                                        *e.pixel_values.shape[-2:]) for e in examples])
    else:
        batch["pixel_values"] = torch.stack([e.pixel_values for e in examples])
        batch["image_windows"] = torch.tensor([e.window for e in examples], dtype=torch.float32)
        if any(e.depth is not None for e in examples):
            s = examples[0].pixel_values.shape[-1]
            batch["depth"] = torch.stack([e.depth if e.depth is not None else torch.zeros(1, s, s)
                                          for e in examples])
    batch["keys"] = [e.key for e in examples]
    batch["corpora"] = [e.corpus for e in examples]
    batch["tasks"] = [e.task for e in examples]
    return batch


# ---------------------------------------------------------------------------------------------- streams

def _worker() -> tuple[int, int]:
    wi = torch.utils.data.get_worker_info()
    return (wi.id, wi.num_workers) if wi is not None else (0, 1)


def mixed_stream(sources: Sequence[Source], *, shuffle: bool, shuffle_buffer: int, resampled: bool, seed: int,
                 epoch: int, rank: int, world_size: int) -> Iterator[dict[str, Any]]:
    """This (rank, worker)'s decoded samples of all sources, interleaved by a seeded weighted draw.

    Not resampled: each source's shards are split by rank and worker (make_webdataset), an exhausted
    source leaves the draw, the stream ends when all are exhausted. Resampled: endless.
    """
    from shards.reader import make_webdataset

    worker, _ = _worker()
    its: list[Iterator[dict[str, Any]] | None] = [
        iter(make_webdataset(list(s.urls), shuffle=shuffle, resampled=resampled, seed=seed + 7919 * i, epoch=epoch,
                             shuffle_buffer=shuffle_buffer, rank=rank, world_size=world_size))
        for i, s in enumerate(sources)
    ]
    weights = [s.weight for s in sources]
    rng = random.Random(f"gr3d-mix:{seed}:{epoch}:{rank}:{worker}")
    while any(it is not None for it in its):
        alive = [i for i, it in enumerate(its) if it is not None]
        x = rng.random() * sum(weights[i] for i in alive)
        pick = alive[-1]
        for i in alive:
            x -= weights[i]
            if x < 0:
                pick = i
                break
        it = its[pick]
        assert it is not None
        try:
            sample = next(it)
        except StopIteration:
            its[pick] = None
            continue
        sample["__source__"] = sources[pick].name
        yield sample


class ShardBatches(torch.utils.data.IterableDataset):  # type: ignore[type-arg]
    """IterableDataset: each DataLoader worker yields whole batches of its own stream, epoch after epoch.

    Messages: {"epoch", "worker", "pos", "batch", "skipped"} where pos = raw samples this worker has read
    in that epoch, then {"epoch", "worker", "pos", "end": True} when its share of the epoch is done. In the
    first epoch `skip[w]` raw samples are skipped (resume) and workers in `done` end at once. With
    `continuous` (deterministic path) the worker goes on with the next epoch, so workers live across
    epochs and prefetch over the boundary; the resampled stream is endless, one epoch per iterator.
    """

    def __init__(self, sources: Sequence[Source], spec: ExampleSpec, *, batch_size: int, epoch: int, rank: int,
                 world_size: int, shuffle: bool = True, shuffle_buffer: int = 1000, resampled: bool = False,
                 skip: Sequence[int] = (), done: Sequence[int] = (), continuous: bool = False):
        super().__init__()
        self.sources, self.spec, self.batch_size = list(sources), spec, batch_size
        self.epoch, self.rank, self.world_size = epoch, rank, world_size
        self.shuffle, self.shuffle_buffer, self.resampled = shuffle, shuffle_buffer, resampled
        self.skip, self.done, self.continuous = list(skip), set(done), continuous and not resampled

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, _ = _worker()
        epoch = self.epoch
        pos = self.skip[worker] if worker < len(self.skip) else 0
        finished = worker in self.done
        while True:
            if not finished:
                yield from self._epoch(worker, epoch, pos)
            else:
                yield {"epoch": epoch, "worker": worker, "pos": pos, "end": True, "skipped": {}}
            if not self.continuous:
                return
            epoch, pos, finished = epoch + 1, 0, False

    def _epoch(self, worker: int, epoch: int, pos: int) -> Iterator[dict[str, Any]]:
        stream = mixed_stream(self.sources, shuffle=self.shuffle, shuffle_buffer=self.shuffle_buffer,
                              resampled=self.resampled, seed=self.spec.seed, epoch=epoch, rank=self.rank,
                              world_size=self.world_size)
        for _ in range(pos):
            if next(stream, None) is None:
                break
        pending: list[Example] = []
        skipped: Counter[str] = Counter()
        for sample in stream:
            pos += 1
            ex, reason = build_example(sample, self.spec, epoch)
            if ex is None:
                skipped[f"{sample['__source__']}:{reason}"] += 1
                continue
            pending.append(ex)
            if len(pending) == self.batch_size:
                yield {"epoch": epoch, "worker": worker, "pos": pos, "skipped": dict(skipped),
                       "batch": collate_examples(pending, self.spec.pad_id)}
                pending, skipped = [], Counter()
        if pending:
            yield {"epoch": epoch, "worker": worker, "pos": pos, "skipped": dict(skipped),
                   "batch": collate_examples(pending, self.spec.pad_id)}
            skipped = Counter()
        yield {"epoch": epoch, "worker": worker, "pos": pos, "end": True, "skipped": dict(skipped)}


def _identity(x: Any) -> Any:
    return x


@dataclass
class LoaderState:
    """Data position of one rank: resumable exactly (same world size and worker count)."""

    epoch: int = 0
    worker_pos: list[int] = field(default_factory=list)
    done: list[int] = field(default_factory=list)
    next_worker: int = 0
    samples: int = 0
    """Samples (examples) this rank consumed in this epoch."""
    batches: int = 0
    skipped: dict[str, int] = field(default_factory=dict)


class TrainLoader:
    """One rank's batches, epoch after epoch, in an order that does not depend on worker timing.

    Iterate `epoch_batches()` for the current epoch, then `next_epoch()`. `state_dict()` after a batch
    is the position just past it. On the deterministic path the DataLoader (and its workers) lives across
    epochs as long as each epoch is read to its end; stopping an epoch early (another rank ran out, a
    resampled epoch is full) or loading a state starts fresh workers at the recorded position.
    """

    def __init__(self, sources: Sequence[Source], spec: ExampleSpec, *, batch_size: int, num_workers: int = 2,
                 shuffle: bool = True, shuffle_buffer: int = 1000, resampled: bool = False,
                 samples_per_epoch: int = 0, rank: int = 0, world_size: int = 1, prefetch_factor: int = 2,
                 pin_memory: bool = False):
        self.sources, self.spec = list(sources), spec
        self.batch_size, self.num_workers = batch_size, num_workers
        self.shuffle, self.shuffle_buffer, self.resampled = shuffle, shuffle_buffer, resampled
        self.rank, self.world_size = rank, world_size
        self.prefetch_factor, self.pin_memory = prefetch_factor, pin_memory
        total = sum(s.n_samples for s in self.sources)
        self.samples_per_epoch = samples_per_epoch or max(1, total // world_size)
        if not resampled:
            for s in self.sources:
                if len(s.urls) < world_size:
                    raise ValueError(f"corpus {s.name} has {len(s.urls)} shards for {world_size} ranks: every rank "
                                     f"needs one (rebuild with smaller chunks, or set data.resampled true)")
        self._it: Iterator[dict[str, Any]] | None = None
        self._buffers: dict[int, deque[dict[str, Any]]] = {}
        self.state = LoaderState()
        self._reset_epoch(0)

    @property
    def n_workers(self) -> int:
        return max(1, self.num_workers)

    def estimated_samples_per_epoch(self) -> int:
        """Per rank: exact for resampled; for the deterministic path an upper bound (skips not known)."""
        return self.samples_per_epoch

    def _reset_epoch(self, epoch: int) -> None:
        self.state = LoaderState(epoch=epoch, worker_pos=[0] * self.n_workers)

    def next_epoch(self) -> None:
        self._reset_epoch(self.state.epoch + 1)

    def close(self) -> None:
        """Stop the workers (a later `epoch_batches` starts new ones at the recorded position)."""
        self._it = None
        self._buffers = {}

    def state_dict(self) -> dict[str, Any]:
        s = self.state
        return {"epoch": s.epoch, "worker_pos": list(s.worker_pos), "done": sorted(s.done),
                "next_worker": s.next_worker, "samples": s.samples, "batches": s.batches, "skipped": dict(s.skipped),
                "num_workers": self.n_workers, "world_size": self.world_size, "rank": self.rank,
                "resampled": self.resampled, "batch_size": self.batch_size}

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        for k, mine in (("num_workers", self.n_workers), ("world_size", self.world_size),
                        ("batch_size", self.batch_size), ("resampled", self.resampled)):
            if d.get(k) != mine:
                raise ValueError(f"cannot resume the data position exactly: saved {k}={d.get(k)}, now {mine}; "
                                 f"use the saved value (data.num_workers / data.batch_size / world size)")
        self.close()
        self.state = LoaderState(epoch=int(d["epoch"]), worker_pos=[int(x) for x in d["worker_pos"]],
                                 done=[int(x) for x in d["done"]], next_worker=int(d["next_worker"]),
                                 samples=int(d["samples"]), batches=int(d["batches"]),
                                 skipped={k: int(v) for k, v in d.get("skipped", {}).items()})

    def _start(self) -> None:
        st = self.state
        ds = ShardBatches(self.sources, self.spec, batch_size=self.batch_size, epoch=st.epoch, rank=self.rank,
                          world_size=self.world_size, shuffle=self.shuffle, shuffle_buffer=self.shuffle_buffer,
                          resampled=self.resampled, skip=st.worker_pos, done=st.done, continuous=True)
        if self.num_workers == 0:
            self._it = iter(ds)
        else:
            self._it = iter(torch.utils.data.DataLoader(
                ds, batch_size=None, num_workers=self.num_workers, collate_fn=_identity,
                prefetch_factor=self.prefetch_factor, pin_memory=self.pin_memory, persistent_workers=False))
        self._buffers = {w: deque() for w in range(self.n_workers)}

    def epoch_batches(self) -> Iterator[dict[str, Any]]:
        """The rest of the current epoch's batches (from the saved position after a resume)."""
        st = self.state
        if self.resampled and st.samples >= self.samples_per_epoch:
            return
        if self._it is None:
            self._start()
        n = self.n_workers
        ended = set(st.done)
        complete = False
        try:
            while len(ended) < n:
                w = st.next_worker
                if w in ended:
                    st.next_worker = (w + 1) % n
                    continue
                while not self._buffers[w]:
                    assert self._it is not None
                    msg = next(self._it)
                    self._buffers[int(msg["worker"])].append(msg)
                msg = self._buffers[w].popleft()
                if msg["epoch"] != st.epoch:
                    raise RuntimeError(f"worker {w} sent epoch {msg['epoch']} data during epoch {st.epoch}")
                st.worker_pos[w] = int(msg["pos"])
                for k, v in msg.get("skipped", {}).items():
                    st.skipped[k] = st.skipped.get(k, 0) + v
                st.next_worker = (w + 1) % n
                if msg.get("end"):
                    ended.add(w)
                    st.done = sorted(ended)
                    continue
                batch = msg["batch"]
                st.samples += len(batch["keys"])
                st.batches += 1
                yield batch
                if self.resampled and st.samples >= self.samples_per_epoch:
                    return
            complete = not self.resampled
        finally:
            if not complete:
                self.close()
