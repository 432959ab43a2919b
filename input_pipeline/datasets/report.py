"""The tally of one split's build: records read, kept, skipped and filtered, by reason.

Every builder counts through a :class:`BuildReport`, so real annotation files lose a bad
record instead of the whole build:

* **skipped**: a record that cannot be used (malformed, its take has no usable view, its
  video is missing, ...). These count against the ceiling ``max_bad_fraction``.
* **filtered**: a record an option excludes (another person's description, a rejected
  annotation pass, ...). Never counted as bad.
* **notes**: things worth knowing that cost no record (an exo view dropped, a clip end
  clamped to its chunk); each reason says what it counts.

The report is stored in the dataset's ``metadata.json`` (``build_report``) and printed by
``python -m input_pipeline.prepare``.
"""

from __future__ import annotations

from collections import Counter

from input_pipeline.annotations import AnnotationError

__all__ = ["BuildReport", "summary_lines"]

EXAMPLES = 3  # offending records named per reason
KINDS = ("skipped", "filtered", "note")


class BuildReport:
    """Counts of one split read from one annotation file (see the module docstring)."""

    def __init__(self, dataset: str, split: str, file: str):
        self.dataset, self.split, self.file = dataset, split, file
        self.read = 0
        self.kept = 0
        self.counts: dict[str, Counter] = {kind: Counter() for kind in KINDS}
        self.examples: dict[str, list[str]] = {}

    # ------------------------------------------------------------------------- counting

    def add_read(self, n: int = 1) -> None:
        """``n`` more records read from the file."""
        self.read += n

    def keep(self) -> None:
        self.kept += 1

    def skip(self, reason: str, example: str, n: int = 1) -> None:
        """``n`` records unusable for ``reason``; ``example`` names one of them."""
        self._add("skipped", reason, example, n)

    def filter(self, reason: str, example: str, n: int = 1) -> None:
        """``n`` records excluded by an option or by the file's own marking."""
        self._add("filtered", reason, example, n)

    def note(self, reason: str, example: str, n: int = 1) -> None:
        self._add("note", reason, example, n)

    def _add(self, kind: str, reason: str, example: str, n: int) -> None:
        if n <= 0:
            return
        self.counts[kind][reason] += n
        seen = self.examples.setdefault(reason, [])
        if len(seen) < EXAMPLES and example not in seen:
            seen.append(example)

    @property
    def skipped(self) -> int:
        return sum(self.counts["skipped"].values())

    @property
    def filtered(self) -> int:
        return sum(self.counts["filtered"].values())

    # ------------------------------------------------------------------------- verdict

    def check(self, max_bad_fraction: float) -> None:
        """Raise :class:`AnnotationError` (with the summary) when the split must not be
        written: nothing kept, or more than ``max_bad_fraction`` of the records skipped."""
        lines = "\n".join(summary_lines(self.to_json()))
        if self.read == 0:
            raise AnnotationError(
                f"{self.file}: holds no records (an empty file, an empty list, or a CSV with "
                f"only its header); nothing to build for {self.dataset} {self.split}"
            )
        if self.skipped > max_bad_fraction * self.read:
            raise AnnotationError(
                f"{self.file}: {self.skipped} of {self.read} records were skipped "
                f"({_pct(self.skipped, self.read)}), more than the ceiling max_bad_fraction="
                f"{max_bad_fraction:g}; nothing was written. Fix the file (or the layout "
                "options), or raise --max-bad-fraction if these records may be dropped "
                "(e.g. 1 for a partial video download).\n" + lines
            )
        if self.kept == 0:
            raise AnnotationError(
                f"{self.file}: every one of its {self.read} records was skipped or filtered "
                "out; nothing to build (check the filter options).\n" + lines
            )

    # ------------------------------------------------------------------------- storage

    def to_json(self) -> dict:
        """The report as stored in ``metadata.json`` (``build_report[split]``)."""
        return {
            "dataset": self.dataset,
            "split": self.split,
            "file": self.file,
            "read": self.read,
            "kept": self.kept,
            **{kind: dict(self.counts[kind].most_common()) for kind in KINDS},
            "examples": self.examples,
        }


def _pct(n: int, total: int) -> str:
    return f"{100 * n / total:.1f}%" if total else "0%"


def summary_lines(report: dict) -> list[str]:
    """Human-readable lines of a stored report (:meth:`BuildReport.to_json`)::

    ego_exo_clip train (annotations/...json): 12 read, 5 kept, 4 skipped (33.3%), 3 filtered
      skipped   3  take without a usable exo view
                   - takes.json: take 'uid' (name): ...
    """
    r = report
    skipped = sum(r["skipped"].values())
    filtered = sum(r["filtered"].values())
    out = [
        f"{r['dataset']} {r['split']} ({r['file']}): {r['read']} read, {r['kept']} kept, "
        f"{skipped} skipped ({_pct(skipped, r['read'])}), {filtered} filtered"
    ]
    for kind in KINDS:
        for reason, n in r[kind].items():
            out.append(f"  {kind:<8} {n:>3}  {reason}")
            out.extend(f"{'':15}- {e}" for e in r["examples"].get(reason, ()))
    return out
