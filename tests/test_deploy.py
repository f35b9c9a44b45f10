"""The deployment files agree with Atlas: the Kubernetes manifest's config loads, and ports, probes,
paths and the command line match what the Dockerfile builds and what Atlas serves.

No container is built here (the build machines have no Docker daemon); what can be checked without one
is checked.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import yaml

from atlas.cli import _parser
from atlas.config import Config, ListenAddress
from atlas.runtime import Runtime

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ROOT / "deploy" / "kubernetes" / "atlas.yaml"
DOCKERFILE = ROOT / "Dockerfile"


def _documents() -> dict[str, dict[str, Any]]:
    documents = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in documents}


def _dockerfile() -> dict[str, list[str]]:
    """Instruction -> its arguments, one entry per line (continuations joined)."""
    instructions: dict[str, list[str]] = {}
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            keyword, _, rest = line.strip().partition(" ")
            instructions.setdefault(keyword, []).append(rest.strip())
    return instructions


def test_the_manifests_config_loads_and_starts() -> None:
    secret = _documents()["Secret/atlas-config"]
    config = Config.from_toml(secret["stringData"]["atlas.toml"], source="atlas.yaml")
    Runtime.from_config(config)  # what start-up reads besides the file, too
    assert ListenAddress.parse(config.proxy.listen).host == "0.0.0.0"
    assert ListenAddress.parse(config.admin.listen).host == "0.0.0.0"
    assert config.admin.token  # a non-loopback ops server needs one


def test_ports_probes_and_command_line_match() -> None:
    documents = _documents()
    config = Config.from_toml(documents["Secret/atlas-config"]["stringData"]["atlas.toml"], source="x")
    pod = documents["Deployment/atlas"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {
        "ws": ListenAddress.parse(config.proxy.listen).port,
        "ops": ListenAddress.parse(config.admin.listen).port,
    }
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "ops"}
    # The config file the container is told to read is the one the Secret is mounted as.
    args = _parser().parse_args(container["args"])
    (mount,) = container["volumeMounts"]
    assert args.config == f"{mount['mountPath']}/atlas.toml"
    assert pod["terminationGracePeriodSeconds"] > config.proxy.drain_timeout
    assert pod["securityContext"]["runAsUser"] == 10001
    services = {d["spec"]["ports"][0]["targetPort"] for k, d in documents.items() if k.startswith("Service/")}
    assert services == {"ws", "ops"}


def test_the_dockerfile_runs_the_same_command_and_copies_what_exists() -> None:
    instructions = _dockerfile()
    (entrypoint,) = instructions["ENTRYPOINT"]
    (cmd,) = instructions["CMD"]
    assert json.loads(entrypoint) == ["python", "-m", "atlas"]
    container = _documents()["Deployment/atlas"]["spec"]["template"]["spec"]["containers"][0]
    assert json.loads(cmd) == container["args"]
    for copy in instructions["COPY"]:
        *sources, _target = shlex.split(copy)
        assert all((ROOT / source).exists() for source in sources), copy
    assert "USER 10001" in DOCKERFILE.read_text()
    assert set(shlex.split(instructions["EXPOSE"][0])) == {"9000", "9001"}
