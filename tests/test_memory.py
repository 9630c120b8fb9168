"""Batches from a memory budget: sizes people write, where the budget comes from, how many items fit, and the
one-line refusal when not even one does."""
import pytest

from movq_deploy import memory
from movq_deploy.memory import MemoryBudget, MemoryBudgetError


@pytest.mark.parametrize("text, size", [("6G", 6 << 30), ("512M", 512 << 20), ("1.5GB", 3 << 29), ("2GiB", 2 << 30),
                                        ("4096", 4096), (1024, 1024)])
def test_sizes_people_write(text, size):
    assert memory.parse_bytes(text) == size


@pytest.mark.parametrize("text", ["lots", "-1G", "0", "6X"])
def test_a_bad_size_is_one_line(text):
    with pytest.raises(ValueError, match="memory size") as error:
        memory.parse_bytes(text)
    assert "\n" not in str(error.value)


def test_the_budget_comes_from_the_argument_then_the_environment_then_available_memory(monkeypatch):
    monkeypatch.setenv(memory.ENV, "3G")
    assert MemoryBudget.resolve("1G", "--memory-budget") == MemoryBudget(1 << 30, "--memory-budget")
    assert MemoryBudget.resolve().size == 3 << 30 and memory.ENV in MemoryBudget.resolve().source
    monkeypatch.setenv(memory.ENV, "nonsense")
    with pytest.raises(ValueError, match=memory.ENV):
        MemoryBudget.resolve()
    monkeypatch.delenv(memory.ENV)
    assert MemoryBudget.resolve(available=8 << 30).size == 2 << 30  # a quarter
    assert MemoryBudget.resolve(available=64 << 30).size == memory.DEFAULT_CAP
    assert 0 < MemoryBudget.resolve().size <= min(memory.DEFAULT_CAP, memory.available_bytes())


def test_items_that_fit_and_the_refusal_when_none_does():
    budget = MemoryBudget(1000, "a test")
    assert budget.items(100, "x") == 10
    assert budget.items(100, "x", fixed=350) == 6
    assert budget.items(100, "x", most=4) == 4
    assert budget.items(999, "x") == 1
    with pytest.raises(MemoryBudgetError, match=r"decoding 256x256 images needs 1.07 KB for one item, more than "
                                                r"the memory budget of 1000 B \(a test\)") as error:
        budget.items(1100, "decoding 256x256 images")
    assert "\n" not in str(error.value)


def test_a_stage_that_cannot_fit_says_so_before_it_starts():
    memory.check_fits(1 << 20, "a small stage")
    with pytest.raises(MemoryBudgetError, match="a huge stage needs about 2 TB, but only .* is available; "
                                                "try less"):
        memory.check_fits(2 << 40, "a huge stage", hint="try less")
