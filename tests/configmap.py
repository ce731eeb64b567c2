"""A config file mounted the way the kubelet mounts a ConfigMap, for the reload tests::

    dir/..2026_11_22_01_00_00.0000011/config.yaml     one directory per version
    dir/..data -> ..2026_11_22_01_00_00.0000011       swapped atomically: rename(..data_tmp, ..data)
    dir/config.yaml -> ..data/config.yaml             the path extauthz is given
"""

from __future__ import annotations

import datetime
import os
import shutil
from pathlib import Path

__all__ = ["ConfigMapVolume"]


class ConfigMapVolume:
    """A directory laid out and updated exactly like a mounted Kubernetes ConfigMap."""

    def __init__(self, directory: Path, key: str = "config.yaml") -> None:
        self.directory = directory
        self.key = key
        self.versions = 0
        directory.mkdir(parents=True)

    @property
    def path(self) -> Path:
        """What the pod reads: ``dir/<key> -> ..data/<key>``."""
        return self.directory / self.key

    def write(self, text: str) -> None:
        """A new version directory, then one rename(2) of ``..data_tmp`` onto ``..data``."""
        self.versions += 1
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y_%m_%d_%H_%M_%S.%f")
        version = self.directory / f"..{stamp}{self.versions}"
        version.mkdir()
        (version / self.key).write_text(text)
        data, data_tmp = self.directory / "..data", self.directory / "..data_tmp"
        previous = os.readlink(data) if data.is_symlink() else None
        os.symlink(version.name, data_tmp)
        os.replace(data_tmp, data)  # the atomic swap
        if not self.path.is_symlink():
            os.symlink(f"..data/{self.key}", self.path)
        if previous is not None:  # the kubelet removes the old version afterwards
            shutil.rmtree(self.directory / previous)
