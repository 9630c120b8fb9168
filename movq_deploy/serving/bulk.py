"""Bulk generation on Ray Data: `movq-deploy generate --engine-dir DIR --num-images N --seed S --out DIR`.

Image i is `Generator.sample(N, seed=S)[i]` (noise stream (S, i)), however many workers run. The output is what an
FID tool or an image-folder loader reads directly:

    out/generation.json           the parameters; a rerun with other parameters is refused
    out/shard-00000/000000000.png one folder per shard of --shard-size images, renamed into place when complete
    out/index.csv                 image,file,class_label (written last)

A killed run is continued by running the same command again: complete shards are skipped, half-written ones (hidden
".shard-*" folders) are removed. Shards are spread over an actor pool of Generators with `map_batches` (one actor per
GPU, else one per CPU slot); Ray runs locally by default, or on a cluster through --address / RAY_ADDRESS.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
from PIL import Image

from movq_deploy import sampling
from movq_deploy.files import atomic_write_text
from movq_deploy.manifest import EngineDir

logger = logging.getLogger("movq_deploy")
PARAMS_NAME = "generation.json"
INDEX_NAME = "index.csv"


@dataclass(frozen=True)
class BulkConfig:
    engine_dir: str
    out: str
    num_images: int
    seed: int
    class_labels: Optional[Sequence[Union[int, str]]] = None  # image i gets class_labels[i % len]; None: no class
    steps: Optional[int] = None
    temperature: Optional[float] = None  # None: the engine directory's default
    choice_temperature: Optional[float] = None
    shard_size: int = 1000
    backend: str = "auto"
    precision: str = "auto"
    batch_size: Optional[int] = None  # most images per engine call (the Generator's default when None)
    guidance_scale: Optional[float] = None  # classifier-free guidance w; None: the engine directory's default

    def __post_init__(self):
        for name in ("num_images", "shard_size"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if not (isinstance(self.seed, int) and self.seed >= 0):
            raise ValueError(f"seed must be a non-negative int, got {self.seed!r}")
        if self.class_labels is not None and len(self.class_labels) == 0:
            raise ValueError("class_labels is empty: give at least one label, or none")

    @property
    def num_shards(self) -> int:
        return -(-self.num_images // self.shard_size)

    def image_label(self, image: int) -> Union[int, str, None]:
        return None if self.class_labels is None else self.class_labels[image % len(self.class_labels)]

    def params(self) -> dict:
        """What the images depend on (the engine dir by its manifest's content, not its path)."""
        params = asdict(self)
        params["class_labels"] = None if self.class_labels is None else list(self.class_labels)
        for moved in ("engine_dir", "out", "backend", "precision", "batch_size"):  # the images do not depend on them
            params.pop(moved)
        if params["guidance_scale"] is None:  # the default: the same parameters as a run started before guidance
            params.pop("guidance_scale")
        return params


def shard_dir(out: Path, shard: int) -> Path:
    return out / f"shard-{shard:05d}"


def image_file(image: int) -> str:
    return f"{image:09d}.png"


class ShardWriter:
    """A Ray Data actor: one Generator; writes the shards it is handed (batch {"shard": int64 [k]}).

    `threads` caps ONNX Runtime's intra-op threads at the actor's CPU share: by default each Generator takes every
    physical core, and one actor per CPU slot would then run cores x cores threads.
    """

    def __init__(self, config: dict, threads: Optional[int] = None):
        from movq_deploy.generator import Generator

        self.config = BulkConfig(**config)
        self.generator = Generator(self.config.engine_dir, backend=self.config.backend,
                                   precision=self.config.precision, batch_size=self.config.batch_size,
                                   threads=threads)

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        counts = [write_shard(self.generator, self.config, int(shard)) for shard in batch["shard"]]
        return {"shard": batch["shard"], "images": np.array(counts, dtype=np.int64)}


def write_shard(generator, config: BulkConfig, shard: int) -> int:
    """Samples the images of one shard into a hidden folder, then renames it into place; returns its image count."""
    from movq_deploy.serving.steps import prior_step_fn

    out = Path(config.out)
    start, stop = shard * config.shard_size, min(config.num_images, (shard + 1) * config.shard_size)
    if shard_dir(out, shard).is_dir():  # Ray retried a task whose first try completed it (its worker died after)
        return stop - start
    partial = out / f".shard-{shard:05d}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    step_fn = prior_step_fn(generator)
    for first in range(start, stop, generator.batch_size):  # one prior batch at a time: memory stays bounded
        count = min(generator.batch_size, stop - first)
        labels = None if config.class_labels is None else [config.image_label(i) for i in range(first, first + count)]
        options = generator.sampling_options(count, config.steps, config.seed, labels, config.temperature,
                                             config.choice_temperature, config.guidance_scale)  # None: the defaults
        tokens = sampling.sample_tokens(step_fn, count, generator.num_slots, generator.mask_id, options.steps,
                                        options.seed, options.class_labels, options.temperature,
                                        options.choice_temperature, max_batch=generator.batch_size,
                                        first_index=first, guidance_scale=options.guidance_scale)
        for offset, pixels in enumerate(generator.decode(tokens, output_type="np")):
            Image.fromarray(pixels).save(partial / image_file(first + offset), format="PNG")
    os.replace(partial, shard_dir(out, shard))
    return stop - start


def generate(config: BulkConfig, workers: Optional[int] = None, cpus_per_worker: float = 1.0,
             address: Optional[str] = None, progress=None) -> Path:
    """Runs (or continues) a bulk generation; returns the index file. progress(done, total) is called per shard."""
    import ray

    _check_labels(config)
    out = Path(config.out)
    todo = _prepare_out(config, out)
    if todo:
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
        ray.data.DataContext.get_current().enable_progress_bars = False  # the caller's progress is per shard
        gpus = ray.cluster_resources().get("GPU", 0.0)
        if workers is None:  # one actor per GPU, else one per CPU slot
            workers = int(gpus) if gpus >= 1 else max(1, int(ray.cluster_resources().get("CPU", 1) // cpus_per_worker))
        workers = min(workers, len(todo))
        threads = None if gpus >= 1 else max(1, int(cpus_per_worker))  # each CPU actor, its share of the cores
        shards = ray.data.from_items([{"shard": shard} for shard in todo], override_num_blocks=len(todo))
        written = shards.map_batches(
            ShardWriter, fn_constructor_args=(asdict(config), threads), batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=cpus_per_worker,
            num_gpus=1 if gpus >= 1 else 0,
        )
        done = config.num_shards - len(todo)
        for _ in written.iter_rows():
            done += 1
            if progress is not None:
                progress(done, config.num_shards)
        _remove_partials(out)  # of workers lost mid-shard (Ray wrote those shards again elsewhere)
    return _write_index(config, out)


def _check_labels(config: BulkConfig) -> None:
    if config.class_labels is None:
        return
    engine_dir = EngineDir.load(config.engine_dir)
    num_classes, names = engine_dir.num_classes, engine_dir.class_names
    for label in config.class_labels:
        if num_classes == 0:
            raise ValueError("class labels were given, but the prior is unconditional")
        if isinstance(label, str) and label not in names:
            raise ValueError(f"unknown class name {label!r}; this model knows {len(names)} names")
        if isinstance(label, int) and not 0 <= label < num_classes:
            raise ValueError(f"class label {label} is out of range: this model has {num_classes} classes")


def _prepare_out(config: BulkConfig, out: Path) -> List[int]:
    """Checks or writes generation.json, removes half-written shards; returns the shards still to write."""
    out.mkdir(parents=True, exist_ok=True)
    params_path = out / PARAMS_NAME
    params = {**config.params(), "manifest_sha256": _manifest_digest(config.engine_dir)}
    if params_path.is_file():
        before = json.loads(params_path.read_text(encoding="utf-8"))
        if before != params:
            changed = sorted(key for key in set(before) | set(params) if before.get(key) != params.get(key))
            raise ValueError(f"{out} holds a generation with other parameters ({', '.join(changed)} differ); "
                             f"use another --out")
    else:
        atomic_write_text(params_path, json.dumps(params, indent=2) + "\n")
    _remove_partials(out)
    todo = [shard for shard in range(config.num_shards) if not shard_dir(out, shard).is_dir()]
    if len(todo) < config.num_shards:
        logger.info("movq-deploy generate: %d of %d shards already complete, skipped", config.num_shards - len(todo),
                    config.num_shards)
    return todo


def _remove_partials(out: Path) -> None:
    for partial in out.glob(".shard-*.partial-*"):
        shutil.rmtree(partial, ignore_errors=True)


def _manifest_digest(engine_dir: str) -> str:
    from movq_deploy.files import sha256_file
    from movq_deploy.manifest import MANIFEST_NAME

    return sha256_file(Path(engine_dir) / MANIFEST_NAME)


def _write_index(config: BulkConfig, out: Path) -> Path:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["image", "file", "class_label"])
    for image in range(config.num_images):
        file = f"{shard_dir(Path('.'), image // config.shard_size).name}/{image_file(image)}"
        label = config.image_label(image)
        writer.writerow([image, file, "" if label is None else label])
    atomic_write_text(out / INDEX_NAME, text.getvalue())
    return out / INDEX_NAME
