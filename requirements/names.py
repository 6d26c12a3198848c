"""Print the names (no versions) of forkrl's dependencies and of the given extras, torch left out.

`make test-latest` installs the newest release of each: `pip install --upgrade $(python
requirements/names.py dev,plots)`. torch is installed on its own, because its build (CPU or CUDA)
is the machine's choice.
"""

import re
import sys
from pathlib import Path

import tomllib


def dependency_names(extras: list[str]) -> list[str]:
    project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"])
    for extra in extras:
        specs += project["optional-dependencies"][extra]
    # A PEP 508 name is what precedes the first extra, version, marker or space.
    names = {re.match(r"[A-Za-z0-9._-]+", spec).group(0).lower() for spec in specs}
    return sorted(names - {"torch"})


if __name__ == "__main__":
    print(" ".join(dependency_names([e for e in (sys.argv[1] if len(sys.argv) > 1 else "").split(",") if e])))
