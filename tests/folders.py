"""Small image folders for tests: real images linked, never copied, into class folders."""

from __future__ import annotations

from pathlib import Path


def link_class_folders(source: Path, root: Path, *, classes: int, per_class: int) -> Path:
    """Links the first ``per_class`` images of each of the first ``classes`` class folders of ``source`` into
    ``root/<class>/`` and returns ``root``."""
    for cls in sorted(p for p in source.iterdir() if p.is_dir())[:classes]:
        (root / cls.name).mkdir(parents=True)
        for image in sorted(cls.iterdir())[:per_class]:
            (root / cls.name / image.name).symlink_to(image)
    return root
