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


def link_camvid_pairs(camvid: Path, root: Path, names: tuple[str, ...] = ("0016E5_07959.png", "0016E5_07961.png"),
                      split: str = "val") -> tuple[Path, Path]:
    """Links the images ``names`` of a CamVid ``split`` and their label maps into ``root/img`` and ``root/lab`` and
    returns both folders."""
    folders = (root / "img", root / "lab")
    for sub, dest in zip((split, f"{split}annot"), folders):
        dest.mkdir(parents=True)
        for name in names:
            (dest / name).symlink_to(camvid / sub / name)
    return folders
