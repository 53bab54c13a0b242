"""The project's requirements from pyproject.toml, one a line, for `pip install -r`.

    python scripts/requirements.py --extra dev --without torchvision

`make install` with a TORCH that names no torchvision (the small CPU build) installs these, then
the project with `pip install --no-deps -e .`: pip cannot leave one dependency out, and the
torchvision it would pick requires a torch of its own, which would replace the one TORCH chose.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pip, in every venv, carries the same parser
    from pip._vendor import tomli as tomllib

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def name(requirement: str) -> str:
    """The normalised project name a PEP 508 requirement starts with (`Torch_Vision>=1` ->
    `torch-vision`)."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", requirement.strip())[0]).lower()


def requirements(pyproject: Path, extras: list[str], without: list[str]) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    found = project["dependencies"] + [
        r for extra in extras for r in project["optional-dependencies"][extra]
    ]
    left_out = {name(w) for w in without}
    return [r for r in found if name(r) not in left_out]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--extra", action="append", default=[], help="an optional extra to add")
    parser.add_argument("--without", action="append", default=[], help="a project to leave out")
    args = parser.parse_args()
    print("\n".join(requirements(PYPROJECT, args.extra, args.without)))


if __name__ == "__main__":
    main()
