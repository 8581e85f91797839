from dataclasses import dataclass


@dataclass
class Interval:
    start: int
    end: int

    def overlaps(self, other: "Interval") -> bool:
        return self.start < other.end and other.start < self.end


def merge_intervals(intervals: list[Interval]) -> list[Interval]:
    """Merge overlapping intervals and return them sorted by start."""
