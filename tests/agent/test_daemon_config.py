"""agent.toml: the documented example parses; every bad key, type and bound is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib

import agent.config as config_module
from agent.config import ConfigError, load_config, parse_config

MINIMAL = """
[device]
id = "pi-7"
state_dir = "state"

[broker]
host = "localhost"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_documented_example_parses() -> None:
    doc = config_module.__doc__ or ""
    example = doc.split("::", 1)[1].split('"""')[0]
    example = "\n".join(line[4:] for line in example.splitlines())
    cfg = parse_config(tomllib.loads(example), Path("/"))
    assert cfg.device.id == "pi-7" and cfg.broker.port == 1883
    assert cfg.http.enabled is False and cfg.telemetry.sample_rate == 0.0


def test_minimal_config_has_safe_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL))
    assert cfg.device.state_dir == tmp_path / "state"  # relative to the file
    assert cfg.broker.username is None and cfg.broker.password() is None
    assert cfg.http.enabled is False and cfg.telemetry.samples_per_window == 0
    opts = cfg.mqtt_options()
    assert opts.client_id == "pi-7" and opts.username == "pi-7" and opts.tls is None
    assert cfg.agent_options().device_class == "generic"
    assert cfg.download_options().block_size == 64 << 10
    assert cfg.telemetry_options().window_s == 60.0
    assert cfg.daemon_dir == tmp_path / "state" / "daemon"


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ("hots = 'x'\n", "hots"),  # appended to [broker]
        ("[brokers]\n", "brokers"),
        ("[download]\nchunk_size = 100\n", "chunk_size"),
        ("[download]\nchunk_size = '64k'\n", "chunk_size"),
        ("[telemetry]\nsample_rate = 2.0\n", "sample_rate"),
        ("[http]\nenabled = 'yes'\n", "enabled"),
        ("[runtime]\ntrial_boot_limit = 0\n", "trial_boot_limit"),
        ("port = true\n", "port"),
        ("[http]\nbind = '0.0.0.0'\n", "loopback"),
    ],
)
def test_bad_keys_and_values_are_refused(tmp_path: Path, extra: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_config(write(tmp_path, MINIMAL + extra))


@pytest.mark.parametrize("device_id", ["pi/7", "pi+", "#", "", "$SYS"])
def test_unsafe_device_ids_are_refused(tmp_path: Path, device_id: str) -> None:
    with pytest.raises(ConfigError):
        load_config(write(tmp_path, MINIMAL.replace('"pi-7"', f'"{device_id}"')))


def test_password_file_must_be_private(tmp_path: Path) -> None:
    secret = tmp_path / "mqtt-password"
    secret.write_text("s3cret\n")
    secret.chmod(0o644)
    cfg = load_config(write(tmp_path, MINIMAL + 'password_file = "mqtt-password"\n'))
    with pytest.raises(ConfigError, match="chmod 600"):
        cfg.mqtt_options()
    secret.chmod(0o600)
    assert cfg.mqtt_options().password == "s3cret"
    secret.write_text("")
    with pytest.raises(ConfigError, match="empty"):
        cfg.mqtt_options()


def test_tls_settings_are_consistent(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="tls"):
        load_config(write(tmp_path, MINIMAL + 'ca_file = "ca.pem"\n'))
    with pytest.raises(ConfigError, match="together"):
        load_config(write(tmp_path, MINIMAL + 'tls = true\ncert_file = "c.pem"\n'))
    cfg = load_config(write(tmp_path, MINIMAL + 'tls = true\nca_file = "ca.pem"\nport = 8883\n'))
    assert cfg.broker.ca_file == tmp_path / "ca.pem"


def test_broker_url_sets_host_port_and_tls(tmp_path: Path) -> None:
    text = MINIMAL.replace('host = "localhost"', 'url = "mqtts://broker.example.net"')
    cfg = load_config(write(tmp_path, text))
    assert (cfg.broker.host, cfg.broker.port, cfg.broker.tls) == ("broker.example.net", 8883, True)
    text = MINIMAL.replace('host = "localhost"', 'url = "mqtt://10.0.0.5:1884"')
    cfg = load_config(write(tmp_path, text))
    assert (cfg.broker.host, cfg.broker.port, cfg.broker.tls) == ("10.0.0.5", 1884, False)
    for bad in ("http://x", "mqtt://user:pw@x", "mqtt://x/path", "mqtt://x:99999"):
        with pytest.raises(ConfigError, match="url"):
            load_config(write(tmp_path, MINIMAL.replace('host = "localhost"', f'url = "{bad}"')))
    with pytest.raises(ConfigError, match="not both"):
        load_config(write(tmp_path, MINIMAL + 'url = "mqtt://x"\n'))


def test_unreadable_or_invalid_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="TOML"):
        load_config(write(tmp_path, "[device\n"))
    with pytest.raises(ConfigError, match="groups"):
        load_config(write(tmp_path, MINIMAL.replace("[broker]", 'groups = ["a", "a"]\n[broker]')))


def _modules_after(code: str) -> set[str]:
    import json
    import subprocess
    import sys

    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.splitlines()[-1]))


def test_daemon_modules_import_nothing_heavy_or_server_side() -> None:
    mods = _modules_after(
        "import agent.daemon, agent.daemon_cli, agent.config, agent.mqtt, agent.download, "
        "agent.telemetry"
    )
    forbidden = ("torch", "fastapi", "sqlalchemy", "server", "compression", "onnx")
    assert sorted(m for m in mods if m.split(".")[0] in forbidden) == []


def test_run_verb_registration_is_cheap() -> None:
    mods = _modules_after("import agent.daemon_cli")
    assert not {"paho", "numpy", "onnxruntime", "agent.core", "agent.daemon"} & mods
