"""The DALI backend (NVIDIA DALI, https://github.com/NVIDIA/DALI).

On a GPU, JPEGs are decoded by nvJPEG (`device="mixed"`, using the hardware decoder where the GPU has
one) and every operator after the decode runs on the GPU, so batches come out on the device. Without
a GPU the same pipeline runs with `device_id=None` and CPU operators (DALI refuses `mixed`, `.gpu()`
and a default device_id of 0 there).

Train: fused decode + random-resized-crop (only the crop's part of the JPEG is decoded), resize,
optional RandAugment (timm's, rebuilt from DALI operators in `dali_augment.py`) or AutoAugment (DALI's
`auto_augment_image_net`, the paper's ImageNet policy as timm's `original`), optional colour jitter
(`color_twist`: torchvision's factor ranges, applied in DALI's one fixed order where torchvision
shuffles the order per image), flip and normalise.
Eval reproduces torchvision's `Resize(floor(size / crop_pct))` + `CenterCrop(size)` (the crop
protocol: output sizes and crop offsets are computed per image with torchvision's rounding) or
`Resize((size, size))` (squash, the official TResNet 448 protocol); the resize is antialiased, and
EXIF orientation is ignored as Pillow does; measured against the torch backend the mean absolute
difference is below one grey level (tests/test_data.py).

The reader reads this rank's file list of the plan (`plan.py`), which already excludes undecodable
files (DALI cannot skip one), so both backends see the same images in the same order. Each epoch
gets a fresh pipeline (its file list, a seed from (seed, epoch, rank)), deserialised from the graph
traced once, after the previous epoch's pipeline is released; mid-epoch resume restores DALI's own
pipeline checkpoint (reader position and every operator's random state). A file that vanishes or
becomes unreadable mid-run stops DALI's reader; the epoch's pipeline is then rebuilt at that step
with the file replaced by the next sample, as the torch backend does (counted in bad_files.py).

Memory on a GPU: nvJPEG preallocates, per decoder thread, one device buffer and two pinned host
buffers of the `device_memory_padding`/`host_memory_padding` sizes (DALI's docs of
`fn.decoders.image`), outside PyTorch's allocator. They are sized from the split's own images
(`decoder_padding`), and one train and one val pipeline are alive at a time; `preallocation` gives
the per-rank total that the start-up line reports.
"""
from __future__ import annotations

import functools
import logging
import os
import shutil
import tempfile
import warnings
import weakref
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from PIL import Image

from .bad_files import BadFiles, unreadable
from .dali_augment import Context, RandAugmentSpec, parse_randaugment, rand_augment
from .folder import DataError, Split
from .plan import ResumableTrainLoader, Stream, TrainPlan, ValPlan, seed_of
from .transforms import Preprocess

log = logging.getLogger(__name__)

_PREFETCH = 2  # batches each pipeline computes ahead of the consumer
# nvJPEG's buffers for one image, in bytes per pixel of the image: NVIDIA's ImageNet paddings
# (211025920 B device, 140544512 B pinned, DALI's and DeepLearningExamples' ResNet-50 examples) over
# the largest ImageNet image they are meant for (5980 x 6430 px, the hardware decoder hints beside
# them) are 5.5 and 3.7 B/px, rounded up here. That fits what nvJPEG's hybrid decode holds: the
# Huffman-decoded DCT coefficients, 2 B each and 1.5 per pixel at 4:2:0 (3 B/px), and the bitstream
# in pinned memory; the same coefficients and the decoded planes (1.5 B/px) on the device.
_DEVICE_BYTES_PER_PIXEL = 6
_PINNED_BYTES_PER_PIXEL = 4
_SIZE_SAMPLE = 1024  # files per split whose header is read to size the decoder buffers
_MIB = 2 ** 20


# GPUs with a hardware JPEG decoder (NVJPG engines): A100/A30 (8.0), H100/H200 (9.0), B200 (10.0).
_HW_JPEG_CAPABILITIES = {(8, 0), (9, 0), (10, 0)}
HW_DECODER_SHARE = 0.65  # of the images, to the hardware decoder (NVIDIA's ImageNet example)


def hardware_decoder_share(device: torch.device) -> float:
    """nvJPEG's `hw_decoder_load`: 0.65 on GPUs with a hardware JPEG decoder, else 0 (all on CUDA)."""
    if device.type != "cuda":
        return 0.0
    return HW_DECODER_SHARE if torch.cuda.get_device_capability(device) in _HW_JPEG_CAPABILITIES \
        else 0.0


# DALI releases (major.minor) whose internals below were read and tested: the iterator's
# `_schedule_runs` (start computing without blocking) and `Pipeline.deserialize` building its
# instance as `cls()` (how `_rebuild` hands it a checkpoint). Any other release takes the public
# path beside each use: the first batch starts computing when it is asked for, and a pipeline that
# restores a checkpoint is traced afresh (seconds with RandAugment, instead of ~50 ms).
DALI_INTERNALS_VERIFIED = ("2.4",)


@functools.cache
def dali_internals_verified() -> bool:
    """True when the installed DALI is a release whose internals we use were verified (warns once
    otherwise)."""
    import nvidia.dali
    if ".".join(nvidia.dali.__version__.split(".")[:2]) in DALI_INTERNALS_VERIFIED:
        return True
    log.warning("DALI %s: its internals are verified only for %s; using public calls instead "
                "(slower epoch starts and resumes; pin nvidia-dali %s.* for the fast path)",
                nvidia.dali.__version__, ", ".join(DALI_INTERNALS_VERIFIED),
                DALI_INTERNALS_VERIFIED[-1])
    return False


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except ImportError:
        return False
    return True


def _interp(types, name: str):
    return {"bilinear": types.INTERP_LINEAR, "bicubic": types.INTERP_CUBIC,
            "nearest": types.INTERP_NN}[name]


def _train_interp(d: "_Dali", name: str):
    """The train resize filter; `random` draws bilinear or bicubic per image (timm's train default)."""
    if name != "random":
        return _interp(d.types, name)
    choice = d.fn.random.choice([int(d.types.INTERP_LINEAR), int(d.types.INTERP_CUBIC)])
    return d.fn.cast(choice, dtype=d.types.INTERP_TYPE)


def _pixels(path: str) -> int:
    """Width x height from the image header (PIL reads no pixel data); 0 if it cannot be read."""
    try:
        with Image.open(path) as im:
            return im.width * im.height
    except OSError:
        return 0


def sample_pixels(paths: list[str], threads: int) -> list[int]:
    """Pixel counts of up to `_SIZE_SAMPLE` files spread evenly over `paths`, sorted; the same
    sample on every rank. Headers only: 0.4-0.9 ms a file on a busy 2-core machine, under a second
    a split."""
    sample = paths[::max(1, len(paths) // _SIZE_SAMPLE)][:_SIZE_SAMPLE]
    with ThreadPoolExecutor(max(1, threads)) as pool:
        return sorted(pool.map(_pixels, sample))


def decoder_padding(pixels: int) -> tuple[int, int]:
    """(device, pinned) bytes of nvJPEG buffer that decode an image of `pixels` without growing,
    rounded up to MiB. A larger image grows that thread's buffer to its need plus the padding: a
    reallocation, not a failure."""
    def mib_up(n: int) -> int:
        return -(-n // _MIB) * _MIB
    return mib_up(pixels * _DEVICE_BYTES_PER_PIXEL), mib_up(pixels * _PINNED_BYTES_PER_PIXEL)


def preallocation(threads: int, *paddings: tuple[int, int]) -> tuple[int, int]:
    """(GPU bytes, pinned host bytes) that pipelines with these (device, pinned) paddings and
    `threads` decoder threads each preallocate: per thread one device buffer and two pinned ones
    (double buffering), per DALI's docs of device_memory_padding/host_memory_padding.

    Per rank: `preallocation(train_loader.threads, train_loader.padding, val_loader.padding)`, the
    one train and one val pipeline that are alive together.
    """
    return (sum(threads * device for device, _ in paddings),
            sum(2 * threads * pinned for _, pinned in paddings))


def describe_preallocation(threads: int, *paddings: tuple[int, int]) -> str:
    """`preallocation` in MiB, for the start-up line."""
    gpu, pinned = preallocation(threads, *paddings)
    if gpu == pinned == 0:
        return "none on CPU"
    return f"{gpu / _MIB:.0f} MiB GPU + {pinned / _MIB:.0f} MiB pinned host"


class _Dali:
    """Lazy DALI imports (the package is optional), the device choice and the decoder's buffers.

    `samples` and `largest` size nvJPEG's per-thread buffers (GPU only; a CPU run reads no headers).
    Train (`largest=True`) reserves room for the largest of the 1024 sampled images, about the
    99.9th percentile: a thread decoding ~20,000 images an epoch (ImageNet, 8 GPUs x 8 threads)
    meets images that large ~20 times an epoch and its buffers would grow to them anyway, so
    reserving it up front keeps reallocations (pinned ones stall the device) out of the training
    loop and makes the reported figure close to the steady state. Val (`largest=False`) reserves
    the median image: its threads decode 25 times fewer images an epoch, meet a large one rarely
    and grow their buffers only when they do (to that image's need plus this padding), instead of
    all reserving room for it from the start.
    """

    def __init__(self, device: torch.device, workers: int, samples: Sequence[tuple[str, int]],
                 largest: bool):
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
        from nvidia.dali import pipeline_def
        from nvidia.dali.auto_aug import auto_augment
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
        self.fn, self.types, self.pipeline_def = fn, types, pipeline_def
        self.auto_augment = auto_augment
        self.Iterator, self.LastBatchPolicy = DALIGenericIterator, LastBatchPolicy
        self.gpu = device.type == "cuda"
        self.device = device
        # No GPU: device_id must be None (DALI's default 0 fails even with CPU-only operators).
        self.device_id = (device.index if device.index is not None else torch.cuda.current_device()
                          ) if self.gpu else None
        self.threads = max(1, workers)
        self.padding = (0, 0)  # (device, pinned) bytes per decoder thread; none on CPU
        if self.gpu:
            spread = samples[::max(1, len(samples) // _SIZE_SAMPLE)]  # not a list of every path
            pixels = sample_pixels([path for path, _ in spread], self.threads)
            self.padding = decoder_padding(pixels[-1] if largest else pixels[len(pixels) // 2])

    def decoder_kwargs(self) -> dict:
        if not self.gpu:
            return {"device": "cpu"}
        # nvJPEG with the hardware decoder where present; fancy upsampling matches libjpeg.
        device, pinned = self.padding
        return {"device": "mixed", "device_memory_padding": device, "host_memory_padding": pinned,
                "hw_decoder_load": hardware_decoder_share(self.device), "jpeg_fancy_upsampling": True}

    def normalize(self, images, pre: Preprocess, mirror=None):
        """uint8 HWC -> float32 CHW (x - 255 mean) / (255 std), flipped where `mirror` is 1."""
        extra = {} if mirror is None else {"mirror": mirror}
        return self.fn.crop_mirror_normalize(
            images, dtype=self.types.FLOAT, output_layout="CHW",
            mean=[255.0 * m for m in pre.mean], std=[255.0 * s for s in pre.std], **extra)


def _train_pipeline(d: _Dali, pre: Preprocess, ra: RandAugmentSpec | None, file_list: str,
                    batch_size: int, seed: int, checkpoint: bytes | None = None):
    """Trace and build the train pipeline; it reads `file_list` ("path label" lines) and restores
    `checkpoint` when given."""
    fn, types = d.fn, d.types

    @d.pipeline_def(enable_conditionals=ra is not None or bool(pre.autoaugment))
    def pipeline():
        jpegs, targets = fn.readers.file(file_list=file_list, random_shuffle=False, name="Reader")
        images = fn.decoders.image_random_crop(
            jpegs, output_type=types.RGB, random_area=list(pre.scale),
            random_aspect_ratio=[3 / 4, 4 / 3], num_attempts=10, adjust_orientation=False,
            **d.decoder_kwargs())
        images = fn.resize(images, size=[pre.img_size, pre.img_size], antialias=True,
                           interp_type=_train_interp(d, pre.train_interpolation or pre.interpolation))
        if ra is not None:
            images = rand_augment(images, Context.create((pre.img_size, pre.img_size), pre.fill),
                                  ra)
        elif pre.autoaugment:  # "original": the AutoAugment paper's ImageNet policy
            images = d.auto_augment.auto_augment_image_net(
                images, max_translate_abs=int(0.45 * pre.img_size),
                fill_value=min(255, round(255 * sum(pre.mean) / 3)))
        if pre.color_jitter:
            factors = [max(0.0, 1 - pre.color_jitter), 1 + pre.color_jitter]
            images = fn.color_twist(images, brightness=fn.random.uniform(range=factors),
                                    contrast=fn.random.uniform(range=factors),
                                    saturation=fn.random.uniform(range=factors))
        mirror = fn.random.coin_flip(probability=pre.hflip) if pre.hflip > 0 else None
        images = d.normalize(images, pre, mirror)
        if d.gpu:
            targets = targets.gpu()
        return images, targets

    # DALI's own auto_aug module calls deprecated aliases of its operators and forces the warning
    # on; record and drop those (only those) instead of printing them.
    with warnings.catch_warnings(record=True) as caught:
        pipe = pipeline(batch_size=batch_size, num_threads=d.threads, device_id=d.device_id,
                        seed=seed, prefetch_queue_depth=_PREFETCH, enable_checkpointing=True,
                        checkpoint=checkpoint)
        pipe.build()
    for w in caught:
        if not (issubclass(w.category, DeprecationWarning) and "nvidia.dali" in str(w.message)):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return pipe


def _rebuild(d: _Dali, graph: bytes, batch_size: int, seed: int, checkpoint: bytes | None):
    """The traced graph again, with a new seed and optionally a checkpoint to restore.

    Tracing RandAugment's conditional graph takes seconds; deserialising takes ~50 ms and, with the
    same seed, gives the same numbers as a fresh trace (checked in tests/test_data.py).
    `Pipeline.deserialize` takes no checkpoint argument, so the instance it creates gets it from
    the constructor of this subclass (DALI internals: only with `dali_internals_verified()`).
    """
    from nvidia.dali import Pipeline

    class _Restoring(Pipeline):
        def __init__(self):  # Pipeline.deserialize instantiates cls() without arguments
            super().__init__(enable_checkpointing=True, checkpoint=checkpoint)

    return _Restoring.deserialize(graph, batch_size=batch_size, num_threads=d.threads,
                                  device_id=d.device_id, seed=seed, prefetch_queue_depth=_PREFETCH,
                                  enable_checkpointing=True,
                                  # deserialize defaults to a synchronous executor; ask for the
                                  # asynchronous, pipelined one pipeline_def uses
                                  exec_pipelined=True, exec_async=True, exec_dynamic=True)


def _resize_center_crop(d: _Dali, pre: Preprocess, jpegs, images):
    """The crop protocol: torchvision `Resize(pre.val_resize)` + `CenterCrop(pre.val_img_size)`,
    with its rounding of the resized sides and of the crop offsets."""
    fn, types = d.fn, d.types
    size, short = pre.val_img_size, pre.val_resize

    def tv_round_half_even(diff):
        # torchvision CenterCrop: int(round(diff / 2)), Python rounding halves to even
        q = diff // 2
        return q + (diff % 2) * (q % 2)

    shape = fn.peek_image_shape(jpegs, adjust_orientation=False)  # H, W, C
    h, w = shape[0], shape[1]
    wide = h <= w  # torchvision Resize(short): short side -> `short`, long -> int(short*long/short)
    new_h = wide * short + (1 - wide) * ((short * h) // w)
    new_w = wide * ((short * w) // h) + (1 - wide) * short
    images = fn.resize(images, resize_x=fn.cast(new_w, dtype=types.FLOAT),
                       resize_y=fn.cast(new_h, dtype=types.FLOAT), antialias=True,
                       interp_type=_interp(types, pre.interpolation))
    start = fn.cast(fn.stack(tv_round_half_even(new_h - size), tv_round_half_even(new_w - size)),
                    dtype=types.INT32)
    return fn.slice(images, start=start, shape=[size, size], axis_names="HW",
                    out_of_bounds_policy="pad")


def _squash(d: _Dali, pre: Preprocess, jpegs, images):
    """The squash protocol: torchvision `Resize((size, size))`, the whole image, aspect not kept."""
    size = float(pre.val_img_size)
    return d.fn.resize(images, resize_x=size, resize_y=size, antialias=True,
                       interp_type=_interp(d.types, pre.interpolation))


def _val_pipeline(d: _Dali, pre: Preprocess, files, labels, batch_size: int):
    fn, types = d.fn, d.types
    resize = _squash if pre.val_resize_mode == "squash" else _resize_center_crop

    @d.pipeline_def
    def pipeline():
        jpegs, targets = fn.readers.file(files=files, labels=labels, random_shuffle=False,
                                         pad_last_batch=True, name="Reader")
        images = fn.decoders.image(jpegs, output_type=types.RGB, adjust_orientation=False,
                                   **d.decoder_kwargs())
        images = d.normalize(resize(d, pre, jpegs, images), pre)
        if d.gpu:
            targets = targets.gpu()
        return images, targets

    pipe = pipeline(batch_size=batch_size, num_threads=d.threads, device_id=d.device_id, seed=0,
                    prefetch_queue_depth=_PREFETCH)
    pipe.build()
    return pipe


def _unpack(out: list[dict], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    images, targets = out[0]["images"], out[0]["targets"]
    return images.to(device, non_blocking=True), targets.view(-1).long().to(device, non_blocking=True)


def _bytes_tensor(data: bytes | str) -> torch.Tensor:
    """DALI's serialized checkpoint as a uint8 tensor (plain data for weights_only loading)."""
    raw = data.encode() if isinstance(data, str) else bytes(data)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).clone()


@dataclass
class _LivePipeline:
    """The pipeline being read: epoch `epoch`'s, started at step `origin`, next yielding `next_step`."""
    epoch: int
    origin: int
    iterator: object  # DALIGenericIterator
    next_step: int


@dataclass
class _PendingResume:
    """A mid-epoch position from `load_state_dict`, restored when that epoch and step are read.

    `origin`: the step the checkpointed pipeline started at (it holds that step's seed);
    `checkpoint`: DALI's serialized pipeline checkpoint (reader position, operator RNG states).
    """
    epoch: int
    step: int
    origin: int
    checkpoint: bytes

    def at(self, epoch: int, step: int) -> bool:
        return (self.epoch, self.step) == (epoch, step)


class DaliTrainLoader(ResumableTrainLoader):
    """The DALI train loader. `state_dict()` adds to the shared position
    `"dali": {"origin": int, "checkpoint": uint8 tensor}` when the position is mid-epoch and a
    pipeline checkpoint for it exists (the on-disk form: plain data for weights_only loading)."""
    backend = "dali"

    def __init__(self, split: Split, plan: TrainPlan, pre: Preprocess, device: torch.device,
                 workers: int, max_bad_fraction: float = 1.0):
        super().__init__(plan, split.classes, split.skipped)
        self.samples, self.pre, self.device = split.samples, pre, device
        self._bad = BadFiles(self.skipped, len(self.samples), max_bad_fraction)
        self._unreadable: set[int] = set()  # sample indices that failed mid-run, read as the next
        self._d = _Dali(device, workers, self.samples, largest=True)
        self.threads, self.padding = self._d.threads, self._d.padding  # for the start-up line
        self._ra = parse_randaugment(pre.randaugment) if pre.randaugment else None
        if self._ra is not None and not self._d.gpu:
            log.warning("DALI's RandAugment on CPU is slower than torchvision's (compare both with "
                        "scripts/bench_loader.py); data.backend=torch may be faster here")
        if any("\n" in path for path, _ in self.samples):
            raise DataError("DALI's file list cannot hold a file name with a newline; rename it or "
                            "use data.backend=torch")
        self._graph = None  # the traced pipeline, serialized; rebuilt per epoch with a new seed
        tmp = tempfile.mkdtemp(prefix="tresnet-dali-")
        self._file_list = os.path.join(tmp, "files.txt")
        weakref.finalize(self, shutil.rmtree, tmp, True)
        self._live: _LivePipeline | None = None
        self._resume: _PendingResume | None = None

    def _iterator(self, epoch: int, origin: int, checkpoint: bytes | None):
        """The epoch's pipeline; `origin` > 0 reads from that step on with its own seed (used only
        when a mid-epoch start has no checkpoint to restore)."""
        b = self.batch_size
        indices = self.plan.rank_indices(epoch)[origin * b:].tolist()
        with open(self._file_list, "w") as f:  # read by the reader when the pipeline is built
            f.writelines(f"{self.samples[i][0]} {self.samples[i][1]}\n"
                         for i in map(self._readable_index, indices))
        seed = seed_of(Stream.DALI, self.plan.seed, epoch, self.plan.rank, origin)
        if not dali_internals_verified():  # public path: a fresh trace restores the checkpoint
            pipe = _train_pipeline(self._d, self.pre, self._ra, self._file_list, b, seed, checkpoint)
        elif self._graph is None:
            pipe = _train_pipeline(self._d, self.pre, self._ra, self._file_list, b, seed)
            self._graph = pipe.serialize()
            if checkpoint is not None:
                pipe = _rebuild(self._d, self._graph, b, seed, checkpoint)
        else:
            pipe = _rebuild(self._d, self._graph, b, seed, checkpoint)
        it = self._d.Iterator([pipe], ["images", "targets"], reader_name="Reader",
                              last_batch_policy=self._d.LastBatchPolicy.DROP, auto_reset=False,
                              prepare_first_batch=False)
        if dali_internals_verified():
            # Start computing now without waiting for the first batch (the iterator's own
            # prepare_first_batch would block the caller until it is ready).
            it._schedule_runs(False)
        return it

    def _batches(self, epoch: int, start_step: int):
        resume, self._resume = self._resume, None
        if resume is not None and resume.at(epoch, start_step):
            origin, checkpoint = resume.origin, resume.checkpoint
        else:
            origin, checkpoint = start_step, None
            if start_step > 0:
                log.warning("DALI: no pipeline checkpoint for epoch %d step %d; reading the same "
                            "remaining images with new augmentation randomness", epoch + 1,
                            start_step)
        # Release the previous pipeline before building this one: DALI's memory pool then hands its
        # decoder buffers to the new pipeline instead of growing by a second train pipeline's worth
        # for good. Building the next epoch's pipeline while this one runs would hide the build and
        # the first batch but hold two pipelines; that costs about one step per epoch (CPU, 2 busy
        # cores, 32 x 500x375 px: first batch of an epoch 0.84 s instead of 0.53 s, median step
        # 0.23 s), against hundreds of steps in an ImageNet epoch.
        step = start_step
        while True:
            self._live = None
            it = self._iterator(epoch, origin, checkpoint)
            self._live = _LivePipeline(epoch, origin, it, next_step=step)
            try:
                for out in it:
                    self._live.next_step += 1
                    yield _unpack(out, self.device)
                return
            except RuntimeError:  # DALI's reader stops the pipeline at a file it cannot open
                step = self._live.next_step
                if not self._skip_unreadable(epoch, step):
                    raise
            origin, checkpoint = step, None  # the same batches from here, without those files

    def _readable_index(self, i: int) -> int:
        """`i`, or the next sample when `i` failed mid-run (the torch backend's replacement)."""
        while i in self._unreadable and len(self._unreadable) < len(self.samples):
            i = (i + 1) % len(self.samples)
        return i

    def _skip_unreadable(self, epoch: int, step: int) -> bool:
        """After the pipeline failed at `step`: find the files of the batches it was reading ahead
        that cannot be opened now, count them (bad_files.py) and leave them out from now on. False
        when every one opens (the error was something else)."""
        b = self.batch_size
        ahead = self.plan.rank_indices(epoch)[step * b:(step + _PREFETCH + 2) * b].tolist()
        found = False
        for i in dict.fromkeys(map(self._readable_index, ahead)):
            why = unreadable(self.samples[i][0])
            if why:
                self._unreadable.add(i)
                self._bad.add(self.samples[i][0], why)
                found = True
        if found:
            log.warning("DALI: rebuilding the epoch %d pipeline at step %d without the skipped "
                        "file(s); the remaining batches get new augmentation randomness", epoch + 1,
                        step)
        return found

    def state_dict(self) -> dict:
        state = super().state_dict()
        live, resume = self._live, self._resume
        if self.next_step == 0:
            return state
        if live is not None and (live.epoch, live.next_step) == (self.epoch, self.next_step):
            origin, checkpoint = live.origin, live.iterator.checkpoints()[0]
        elif resume is not None and resume.at(self.epoch, self.next_step):
            origin, checkpoint = resume.origin, resume.checkpoint
        else:
            return state  # nothing to restore: a later set_epoch() restarts the pipeline
        state["dali"] = {"origin": origin, "checkpoint": _bytes_tensor(checkpoint)}
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        dali = state.get("dali")
        if dali is not None and state.get("plan") == self.plan.identity():
            self._resume = _PendingResume(self.epoch, self.next_step, origin=int(dali["origin"]),
                                          checkpoint=dali["checkpoint"].numpy().tobytes())
        self._live = None


class DaliValLoader:
    """Same contract as the torch val loader; one pipeline, reset after each pass."""

    def __init__(self, split: Split, plan: ValPlan, pre: Preprocess, device: torch.device,
                 workers: int):
        self.classes, self.skipped, self.plan = split.classes, list(split.skipped), plan
        self.num_images = plan.num_samples
        self.device, self.pre = device, pre
        indices, pad = plan.rank_indices()
        self._files = [split.samples[i][0] for i in indices]
        self._labels = [-1 if p else split.samples[i][1] for i, p in zip(indices, pad)]
        self._d = _Dali(device, workers, split.samples, largest=False)
        self.threads, self.padding = self._d.threads, self._d.padding  # for the start-up line
        self._it = None
        self._clean = False  # the last pass ran to the end, so the iterator can be reused

    def __len__(self) -> int:
        return self.plan.steps

    def __iter__(self):
        if self._it is None or not self._clean:
            pipe = _val_pipeline(self._d, self.pre, self._files, self._labels, self.plan.batch_size)
            self._it = self._d.Iterator([pipe], ["images", "targets"], reader_name="Reader",
                                        last_batch_policy=self._d.LastBatchPolicy.PARTIAL,
                                        auto_reset=True)
        self._clean = False
        for out in self._it:
            yield _unpack(out, self.device)
        self._clean = True
