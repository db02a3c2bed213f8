"""Re-vendor the KubeRay CRD schemas our manifests are validated against.

    python cluster/kuberay/crds/vendor_crds.py PATH/TO/kuberay/ray-operator/config/crd/bases

For each CRD (RayCluster, RayJob) this writes the ``v1`` ``openAPIV3Schema`` as JSON next to this file,
with the group/version/kind it describes, and prints the sha256 of the source YAML for README.md.
Nothing is changed in the schemas; the strict check (``additionalProperties: false``) is added at
validation time by ``cluster/validate.py``.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
CRDS = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
VERSION = "v1"


def extract(crd_path: Path, kind: str) -> dict:
    """``{"group", "version", "kind", "schema"}`` for the ``VERSION`` of the CRD in ``crd_path``."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load(crd_path.read_text(), Loader=loader)
    if crd.get("kind") != "CustomResourceDefinition" or crd["spec"]["names"]["kind"] != kind:
        raise ValueError(f"{crd_path}: not the CustomResourceDefinition of {kind}")
    for version in crd["spec"]["versions"]:
        if version["name"] == VERSION:
            return {
                "group": crd["spec"]["group"],
                "version": VERSION,
                "kind": kind,
                "schema": version["schema"]["openAPIV3Schema"],
            }
    raise ValueError(f"{crd_path}: no version {VERSION}")


def output_path(kind: str) -> Path:
    return HERE / f"{kind.lower()}.{VERSION}.schema.json"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    src = Path(args[0])
    for kind, name in CRDS.items():
        path = src / name
        doc = extract(path, kind)
        output_path(kind).write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
        print(f"{output_path(kind).name}: from {name} sha256 {hashlib.sha256(path.read_bytes()).hexdigest()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
