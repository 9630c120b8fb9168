"""The interface every training data source has (photos in memory, a folder, tar shards, scikit-learn's digits).

A source sets `source` (where the data came from), `split` (how it was split), `image_size` and `class_names`, and
gives `train_set(seed, length)` (the training crops), `eval_set()` (the held-out crops) and `sizes()`. What a run
records of its data, `summary()`, and `num_classes` are the same for all of them, so they are written here once.
"""
from __future__ import annotations


class DataSource:
    source: str
    split: str
    image_size: int
    class_names: "list[str]"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def sizes(self) -> dict:
        """How big the training and held-out parts are, under the source's own names (e.g. "train_pictures",
        "eval_crops")."""
        raise NotImplementedError

    def summary(self) -> dict:
        """What a run records of its data: the checkpoint's record, and part of the prior's token-cache key."""
        return {"source": self.source, "split": self.split, "image_size": self.image_size, **self.sizes(),
                "class_names": list(self.class_names)}
