"""Offline checks of everything under ``cluster/``: no cloud, no Kubernetes, no Docker daemon needed.

    python cluster/validate.py                      # all checks below on the files of this repo
    python cluster/validate.py launcher FILE...     # Ray cluster launcher YAML (the checks `ray up` runs)
    python cluster/validate.py kuberay FILE...      # Kubernetes manifests, ray.io kinds in strict mode
    python cluster/validate.py dockerfile FILE...   # instructions, non-root user, pins == constraints.txt
    python cluster/validate.py secrets PATH...      # credential patterns

* Launcher: Ray's own ``prepare_config`` (fills defaults as ``ray up`` does) then ``validate_config``
  (the JSON schema shipped with Ray). Private Ray API, hence the exact Ray pin.
* KubeRay: every YAML document parses; ``ray.io`` kinds are validated against the vendored CRD schemas
  (``cluster/kuberay/crds/``) with ``additionalProperties: false`` added wherever the schema lists
  properties and does not say otherwise, so a misspelt field is an error instead of being pruned.
  Core kinds are checked for a known apiVersion/kind and a name; Deployment/StatefulSet pod templates are
  validated strictly against Kubernetes' PodTemplateSpec schema embedded in the RayCluster CRD.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import yaml

CLUSTER_DIR = Path(__file__).resolve().parent
REPO_ROOT = CLUSTER_DIR.parent
CRD_DIR = CLUSTER_DIR / "kuberay" / "crds"
CRD_FILES = {"RayCluster": "raycluster.v1.schema.json", "RayJob": "rayjob.v1.schema.json"}
CORE_KINDS = {
    "ConfigMap": "v1",
    "PersistentVolumeClaim": "v1",
    "Secret": "v1",
    "Service": "v1",
    "ServiceAccount": "v1",
    "Deployment": "apps/v1",
    "StatefulSet": "apps/v1",
    "NetworkPolicy": "networking.k8s.io/v1",
}


class ValidationError(ValueError):
    """A cluster file is wrong; the message names the file and what was expected."""


# --------------------------------------------------------------------------------------------- launcher


def validate_launcher(config: dict, source: str = "<config>") -> dict:
    """Run Ray's ``prepare_config`` + ``validate_config`` on a launcher config; returns the prepared config."""
    import logging

    from ray.autoscaler._private.util import prepare_config, validate_config

    logging.getLogger("ray.autoscaler._private.util").setLevel(logging.WARNING)  # "setting max workers ..."
    if not isinstance(config, dict):
        raise ValidationError(f"{source}: a launcher config must be a mapping, got {type(config).__name__}")
    try:
        prepared = prepare_config(copy.deepcopy(config))
        validate_config(prepared)
    except Exception as e:  # jsonschema.ValidationError, ValueError, KeyError, AssertionError from Ray
        message = getattr(e, "message", None) or str(e)
        where = "/".join(str(p) for p in getattr(e, "absolute_path", []))
        raise ValidationError(f"{source}: {where + ': ' if where else ''}{message}") from e
    return prepared


# --------------------------------------------------------------------------------------------- kubernetes


@cache
def crd_schema(kind: str) -> dict:
    """The vendored ``{"group", "version", "kind", "schema"}`` of a KubeRay kind."""
    return json.loads((CRD_DIR / CRD_FILES[kind]).read_text())


def strict(schema: dict) -> dict:
    """A copy of ``schema`` where objects listing ``properties`` reject unknown keys (kubeconform -strict).

    Left open: schemas that set ``additionalProperties`` or ``x-kubernetes-preserve-unknown-fields``.
    """
    out = copy.deepcopy(schema)
    stack = [out]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return out


@cache
def _validator(kind: str):
    import jsonschema

    return jsonschema.Draft4Validator(strict(crd_schema(kind)["schema"]))


@cache
def _pod_template_validator():
    """Kubernetes' PodTemplateSpec schema, as embedded in the vendored RayCluster CRD (head group template)."""
    import jsonschema

    spec = crd_schema("RayCluster")["schema"]["properties"]["spec"]
    return jsonschema.Draft4Validator(strict(spec["properties"]["headGroupSpec"]["properties"]["template"]))


def _schema_errors(validator, instance, label: str, prefix: str = "") -> list[str]:
    problems = []
    for err in sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path)):
        path = ".".join([prefix, *(str(p) for p in err.absolute_path)] if prefix else map(str, err.absolute_path))
        problems.append(f"{label}: {path or '<root>'}: {err.message}")
    return problems


def k8s_errors(doc: dict, source: str = "<manifest>") -> list[str]:
    """Problems of one Kubernetes object (empty = valid)."""
    if not isinstance(doc, dict):
        return [f"{source}: a manifest must be a mapping, got {type(doc).__name__}"]
    kind, api = doc.get("kind"), doc.get("apiVersion")
    name = (doc.get("metadata") or {}).get("name")
    label = f"{source}: {kind} {name or '<unnamed>'}"
    problems = []
    if not name:
        problems.append(f"{label}: metadata.name is required")
    if kind in CRD_FILES:
        crd = crd_schema(kind)
        want = f"{crd['group']}/{crd['version']}"
        if api != want:
            problems.append(f"{label}: apiVersion must be {want} (the vendored CRD version), got {api!r}")
        problems += _schema_errors(_validator(kind), doc, label)
    elif kind in CORE_KINDS:
        if api != CORE_KINDS[kind]:
            problems.append(f"{label}: apiVersion must be {CORE_KINDS[kind]}, got {api!r}")
        if kind in ("Deployment", "StatefulSet"):
            problems += _workload_errors(doc, label)
    else:
        problems.append(f"{label}: unknown kind (known: {sorted([*CRD_FILES, *CORE_KINDS])})")
    return problems


def _workload_errors(doc: dict, label: str) -> list[str]:
    """A Deployment/StatefulSet: strict pod template, and a selector that matches the template's labels."""
    spec = doc.get("spec") or {}
    template = spec.get("template")
    if not isinstance(template, dict):
        return [f"{label}: spec.template is required"]
    problems = _schema_errors(_pod_template_validator(), template, label, "spec.template")
    selector = (spec.get("selector") or {}).get("matchLabels") or {}
    labels = (template.get("metadata") or {}).get("labels") or {}
    if not selector or any(labels.get(k) != v for k, v in selector.items()):
        problems.append(f"{label}: spec.selector.matchLabels {selector} must match spec.template.metadata.labels")
    return problems


def validate_manifest_file(path: Path) -> list[dict]:
    """Parse every YAML document of ``path`` and validate it; returns the documents."""
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except yaml.YAMLError as e:
        raise ValidationError(f"{path}: not valid YAML: {e}") from e
    if not docs:
        raise ValidationError(f"{path}: no Kubernetes object in file")
    problems = [p for i, d in enumerate(docs) for p in k8s_errors(d, f"{path}[{i}]")]
    if problems:
        raise ValidationError("\n".join(problems))
    return docs


# --------------------------------------------------------------------------------------------- dockerfile

DOCKER_INSTRUCTIONS = frozenset(
    "FROM RUN CMD LABEL MAINTAINER EXPOSE ENV ADD COPY ENTRYPOINT VOLUME USER WORKDIR ARG ONBUILD "
    "STOPSIGNAL HEALTHCHECK SHELL".split()
)


@dataclass(frozen=True)
class Instruction:
    line: int  # 1-based line where the instruction starts
    name: str  # upper case, e.g. "RUN"
    args: str  # continuation lines joined with a space, comments inside continuations removed


def parse_dockerfile(text: str, source: str = "Dockerfile") -> list[Instruction]:
    """Split a Dockerfile into instructions (default escape character ``\\``)."""
    out: list[Instruction] = []
    parts: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue  # blank lines and comments, also inside a continuation
        if not parts:
            start = number
        continued = stripped.endswith("\\")
        parts.append(stripped[:-1].strip() if continued else stripped)
        if continued:
            continue
        name, _, args = " ".join(parts).partition(" ")
        if name.upper() not in DOCKER_INSTRUCTIONS:
            raise ValidationError(f"{source}:{start}: unknown instruction {name!r}")
        out.append(Instruction(start, name.upper(), args.strip()))
        parts = []
    if parts:
        raise ValidationError(f"{source}:{start}: the file ends inside a line continuation")
    return out


def read_constraints(path: Path = REPO_ROOT / "constraints.txt") -> dict[str, str]:
    """``{normalised name: version}`` of the ``name==version`` lines of a pip constraints file."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[_norm(name.split("[")[0])] = version.strip()
    return pins


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower().strip()


def dockerfile_errors(path: Path, constraints: dict[str, str]) -> list[str]:
    """FROM first, a known base tag, non-root final user, pins equal to constraints, no secret-like ENV/ARG."""
    ins = parse_dockerfile(path.read_text(), str(path))
    problems = []
    firsts = [i for i in ins if i.name != "ARG"]
    if not firsts or firsts[0].name != "FROM":
        problems.append(f"{path}: the first instruction (after ARG) must be FROM")
    for i in ins:
        if i.name == "FROM":
            image = i.args.split()[0]
            m = re.fullmatch(r"rayproject/ray(?:-ml)?:(\d+\.\d+\.\d+)(-.*)?", image)
            if m and m.group(1) != constraints.get("ray"):
                problems.append(
                    f"{path}:{i.line}: base {image} has ray {m.group(1)}, "
                    f"constraints.txt pins ray=={constraints.get('ray')}"
                )
        if i.name in ("ENV", "ARG") and re.search(r"(PASSWORD|SECRET|TOKEN|ACCESS_KEY)\w*\s*=\s*\S", i.args, re.I):
            problems.append(f"{path}:{i.line}: {i.name} sets a secret-like variable; pass secrets at run time")
        if i.name == "RUN":
            problems += _pip_errors(path, i, constraints)
    users = [i.args.split(":")[0] for i in ins if i.name == "USER"]
    if not users or users[-1] in ("root", "0"):
        problems.append(f"{path}: the image must end with a non-root USER")
    return problems


def _pip_errors(path: Path, ins: Instruction, constraints: dict[str, str]) -> list[str]:
    problems = []
    for command in re.split(r"&&|;|\|\|", ins.args):
        try:
            words = shlex.split(command)
        except ValueError:
            words = command.split()
        if "pip" not in [Path(w).name for w in words[:3]] and "pip3" not in words[:3] or "install" not in words:
            continue
        args = words[words.index("install") + 1 :]
        for word in args:
            m = re.fullmatch(r"([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==([^\s;]+)", word)
            if m and _norm(m.group(1)) in constraints and constraints[_norm(m.group(1))] != m.group(3):
                problems.append(
                    f"{path}:{ins.line}: installs {m.group(1)}=={m.group(3)} but constraints.txt pins "
                    f"{constraints[_norm(m.group(1))]}"
                )
            elif not m and re.fullmatch(r"[A-Za-z][A-Za-z0-9_.\-]*(\[[^\]]*\])?", word) and _norm(word) in constraints:
                problems.append(f"{path}:{ins.line}: installs {word} without a pin")
        installs_project = any(w in (".", "-e") or w.startswith("./") for w in args)
        constrained = any(w == "constraints.txt" or w.endswith("/constraints.txt") for w in args)
        if installs_project and not ("-c" in args and constrained):
            problems.append(f"{path}:{ins.line}: installs the project without `-c constraints.txt`")
    return problems


# --------------------------------------------------------------------------------------------- secrets

_SECRET_PATTERNS = [
    ("AWS access key id", re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")),
    ("AWS secret access key", re.compile(r"aws_secret_access_key\s*[:=]\s*['\"]?[A-Za-z0-9/+=]{30,}", re.I)),
    ("private key", re.compile(r"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----")),
    ("GitHub token", re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36}\b")),
    ("password assignment", re.compile(r"\b\w*passw(?:or)?d\w*\s*[:=]\s*['\"]?(?P<v>[^\s'\"]{4,})", re.I)),
    ("credentials in a URI", re.compile(r"://[^/\s:@'\"]+:(?P<v>[^@\s/'\"]+)@")),
    ("token assignment", re.compile(r"\b\w*token\w*\s*[:=]\s*['\"]?(?P<v>[A-Za-z0-9_\-]{24,})", re.I)),
]


def _is_placeholder(value: str) -> bool:
    """``$VAR``, ``${VAR}``, ``$(cmd)``, ``<...>`` or an upper-case word such as PASSWORD / REPLACE_ME."""
    return bool(re.fullmatch(r"\$.*|<.*>|[A-Z][A-Z0-9_]*|\*+", value))


def secret_findings(text: str, source: str) -> list[str]:
    findings = []
    for number, line in enumerate(text.splitlines(), 1):
        for label, pattern in _SECRET_PATTERNS:
            for m in pattern.finditer(line):
                value = m.groupdict().get("v")
                if value is not None and _is_placeholder(value):
                    continue
                findings.append(f"{source}:{number}: looks like a {label}: {line.strip()[:120]}")
    return findings


def scan_secrets(paths: Iterable[Path]) -> list[str]:
    """Credential-like strings in the text files under ``paths`` (directories are walked)."""
    findings = []
    for root in paths:
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for f in files:
            if f.suffix in (".json", ".pyc") or "__pycache__" in f.parts:
                continue  # vendored schemas, bytecode
            findings += secret_findings(f.read_text(errors="replace"), str(f))
    return findings


# --------------------------------------------------------------------------------------------- CLI


def check_repo() -> list[str]:
    """Every check on this repository's cluster files; returns the problems."""
    problems: list[str] = []
    try:
        validate_launcher(yaml.safe_load((CLUSTER_DIR / "aws-a100.yaml").read_text()), "cluster/aws-a100.yaml")
    except ValidationError as e:
        problems.append(str(e))
    for path in sorted((CLUSTER_DIR / "kuberay").glob("*.yaml")):
        try:
            validate_manifest_file(path)
        except ValidationError as e:
            problems.append(str(e))
    constraints = read_constraints()
    for path in sorted(CLUSTER_DIR.rglob("Dockerfile")):
        problems += dockerfile_errors(path, constraints)
    problems += scan_secrets([CLUSTER_DIR, REPO_ROOT / "docs" / "cluster.md"])
    return problems


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        problems = check_repo()
    else:
        what, files = args[0], [Path(a) for a in args[1:]]
        problems = []
        for f in files:
            try:
                if what == "launcher":
                    validate_launcher(yaml.safe_load(f.read_text()), str(f))
                elif what == "kuberay":
                    validate_manifest_file(f)
                elif what == "dockerfile":
                    problems += dockerfile_errors(f, read_constraints())
                elif what != "secrets":
                    print(__doc__, file=sys.stderr)
                    return 2
            except ValidationError as e:
                problems.append(str(e))
        if what == "secrets":
            problems += scan_secrets(files)
    for p in problems:
        print(p, file=sys.stderr)
    print("OK" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
