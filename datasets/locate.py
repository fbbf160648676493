"""One locator for every file-backed dataset: from ``root`` to the folder that holds the files."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from datasets.base import DatasetError


@dataclass(frozen=True)
class Layout:
    """Where a dataset's files may sit relative to ``root``.

    ``folders``: sub-folders of ``root`` tried in order (the first is the conventional name, used
    in messages). ``markers``: file names any one of which shows that a folder holds the data, so
    ``root`` may also be that folder itself. ``basename``: a folder name that counts as the data
    folder even before its files are checked. ``describe``: the layout in words, for messages.
    ``default_roots``: folders searched when ``root`` is None (files installed by a system
    package). ``not_found_hint``: appended to the "not found" message (how to get the files).
    ``not_found_what``: what the "not found" message says is missing (default ``<folder>/``).
    """

    name: str
    folders: tuple[str, ...]
    markers: tuple[str, ...]
    describe: str
    basename: str | None = None
    default_roots: tuple[str, ...] = ()
    not_found_hint: str = " (dataset.download=true fetches it; download=True in Python)"
    not_found_what: str | None = None


def _holds(folder: str, markers: Sequence[str]) -> bool:
    return any(os.path.isfile(os.path.join(folder, m)) for m in markers)


def find_folder(root: str | os.PathLike | None, layout: Layout) -> str:
    """The folder holding ``layout``'s files, or a DatasetError naming the path and the layout.

    With ``root`` None the ``default_roots`` that hold a marker are used, else it is an error. A
    given ``root`` is used as is: ``root/<folder>`` for each of ``folders`` that exists, else
    ``root`` itself when it is named ``basename`` or holds a marker file.
    """
    if root is None:
        for candidate in layout.default_roots:
            if os.path.isdir(candidate) and _holds(candidate, layout.markers):
                return candidate
        where = (
            f" (nor found in {', '.join(layout.default_roots)})" if layout.default_roots else ""
        )
        raise DatasetError(
            f"{layout.name} needs root: a directory holding {layout.folders[0]}/{where} "
            f"(expected {layout.describe})"
        )
    root = os.path.expanduser(os.fspath(root))
    if not os.path.isdir(root):
        raise DatasetError(
            f"{layout.name} root {root!r} is not a directory; expected {layout.describe}"
        )
    for sub in layout.folders:
        folder = os.path.join(root, sub)
        if os.path.isdir(folder):
            return folder
    named = layout.basename is not None and os.path.basename(os.path.normpath(root)) == (
        layout.basename
    )
    if named or _holds(root, layout.markers):
        return root
    what = layout.not_found_what or f"{layout.folders[0]}/"
    raise DatasetError(
        f"{layout.name}: no {what} under {root!r}; expected {layout.describe}{layout.not_found_hint}"
    )


def download_root(root: str | os.PathLike | None, name: str, folder: str) -> str:
    """The directory a torchvision download writes into: ``root``, or its parent when ``root`` is
    the dataset folder itself (named ``folder``)."""
    if root is None:
        raise DatasetError(
            f"{name}: dataset.download=true (download=True in Python) needs dataset.root, the "
            "directory to download into"
        )
    root = os.path.expanduser(os.fspath(root))
    if os.path.basename(os.path.normpath(root)) == folder:
        root = os.path.dirname(os.path.normpath(root))
    return root
