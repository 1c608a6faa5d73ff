"""Fixed shuffled subsets: disjoint ranges are disjoint, the same range is the same images."""

from __future__ import annotations

import pytest

from polyglean.data import parse_subset, subset_dataset


def test_disjoint_ranges_cover_the_set() -> None:
    data = list(range(100))
    a, b = subset_dataset(data, 0, 60), subset_dataset(data, 60)
    assert len(a) == 60 and len(b) == 40
    assert sorted([a[i] for i in range(len(a))] + [b[i] for i in range(len(b))]) == data
    again = subset_dataset(data, 0, 60)
    assert [again[i] for i in range(60)] == [a[i] for i in range(60)]
    assert [a[i] for i in range(60)] != list(range(60))  # shuffled, so spread over a class-sorted folder


@pytest.mark.parametrize("text, expected", [("0:20000", (0, 20000)), ("650:", (650, -1)), (":10", (0, 10))])
def test_parse(text: str, expected: tuple[int, int]) -> None:
    assert parse_subset(text) == expected


@pytest.mark.parametrize("text", ["10", "a:b", "5:5", "-1:3", "9:2"])
def test_parse_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="subset"):
        parse_subset(text)


def test_out_of_range() -> None:
    with pytest.raises(ValueError, match="outside a data set of 10 images"):
        subset_dataset(list(range(10)), 5, 20)
