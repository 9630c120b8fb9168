"""movq_deploy/training/source.py: the summary a run records (and keys the prior's token cache with) and
num_classes, written once for every data source."""
from movq_deploy.training.source import DataSource


class _Source(DataSource):
    source, split, image_size, class_names = "somewhere", "images", 32, ["cat", "dog"]

    def sizes(self) -> dict:
        return {"train_pictures": 7, "eval_crops": 3}


def test_summary_keeps_the_recorded_keys_in_order_with_the_sources_own_sizes():
    summary = _Source().summary()
    assert list(summary) == ["source", "split", "image_size", "train_pictures", "eval_crops", "class_names"]
    assert summary["class_names"] == ["cat", "dog"] and summary["class_names"] is not _Source.class_names
    assert _Source().num_classes == 2
