"""Ships the manual inside the package at build time: docs/*.md, README.md and the deploy/ examples are copied
into grayagent/_docs/ of the wheel, so `grayagent docs TOPIC` works from any install while the repository keeps
a single copy of each file. Everything else is in pyproject.toml."""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithDocs(build_py):
    def run(self) -> None:
        super().run()
        import sys

        sys.path.insert(0, str(ROOT))
        from grayagent.docs import SOURCES  # the one table of what ships under which topic

        target = Path(self.build_lib) / "grayagent" / "_docs"
        target.mkdir(parents=True, exist_ok=True)
        for topic, source in SOURCES.items():
            shutil.copyfile(ROOT / source, target / f"{topic}{Path(source).suffix}")


setup(cmdclass={"build_py": BuildPyWithDocs})
