"""Where the installed native parts live (libamesh.so, libxds.so, lua/, include/).

In a regular install that is the package directory. In an editable install the Python
modules come from the source tree while CMake's output stays in site-packages: the package
then has two __path__ entries, and the one holding the library is the one to use."""

from __future__ import annotations

from pathlib import Path

import amesh_ext

LIBRARY_NAME = "libamesh.so"


def install_dir() -> Path:
    for entry in amesh_ext.__path__:
        if (Path(entry) / LIBRARY_NAME).exists():
            return Path(entry).resolve()
    return Path(amesh_ext.__file__).resolve().parent


def library() -> Path:
    return install_dir() / LIBRARY_NAME


def bundled_mesh() -> Path:
    return Path(amesh_ext.__file__).resolve().parent / "mesh" / "bookinfo"
