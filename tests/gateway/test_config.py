"""GatewayConfig: precedence (defaults ← TOML ← BANDGATE_* ← flags) and errors that name the setting."""

from __future__ import annotations

import pytest

from gateway.cli import main
from gateway.config import ConfigError, GatewayConfig, load_config


def test_precedence_file_env_flags(tmp_path):
    toml = tmp_path / "gw.toml"
    toml.write_text('[gateway]\nmax_frames_per_batch = 77\ncommit_queue = 5\nlisten = "127.0.0.1:1"\n')
    cfg = load_config(
        file=toml,
        environ={"BANDGATE_COMMIT_QUEUE": "9", "BANDGATE_RATE_BATCHES_PER_S": "2.5"},
        overrides={"listen": "127.0.0.1:2", "store": None},
    )
    assert cfg.max_frames_per_batch == 77  # file
    assert cfg.commit_queue == 9  # environment over file
    assert cfg.rate_batches_per_s == 2.5
    assert cfg.listen == "127.0.0.1:2"  # flag over file
    assert cfg.store == GatewayConfig().store  # a flag left out does not override


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"environ": {"BANDGATE_COMMIT_QUEUE": "0"}}, "commit_queue"),
        ({"environ": {"BANDGATE_MAX_FRAMES_PER_BATCH": "many"}}, "BANDGATE_MAX_FRAMES_PER_BATCH"),
        ({"overrides": {"listen": "nowhere"}}, "listen"),
        ({"overrides": {"store": "bandgate.db"}}, "store"),
        ({"environ": {"BANDGATE_RATE_SAMPLES_PER_S": "-1"}}, "rate_samples_per_s"),
        ({"environ": {"BANDGATE_COMPUTE_PROCESSES": "-1"}}, "compute_processes"),
        ({"environ": {"BANDGATE_COMPUTE_QUEUE": "0"}}, "compute_queue"),
        ({"environ": {"BANDGATE_WORKERS": "0"}}, "workers"),
        ({"environ": {"BANDGATE_RETENTION_DAYS": "-1"}}, "retention_days"),
        ({"environ": {"BANDGATE_RETENTION": "pulse=30"}}, "retention: unknown family 'pulse'"),
        ({"environ": {"BANDGATE_RETENTION": "heart=-1"}}, "retention: heart: days must be >= 0"),
        ({"environ": {"BANDGATE_RETENTION": "heart=90,heart=30"}}, "retention: heart is given twice"),
        ({"environ": {"BANDGATE_RETENTION": "heart"}}, "retention: 'heart' is not FAMILY=DAYS"),
        ({"environ": {"BANDGATE_RETENTION_CHECK_S": "0"}}, "retention_check_s"),
        ({"environ": {"BANDGATE_AUDIT_SEGMENT_ENTRIES": "0"}}, "audit_segment_entries"),
        ({"environ": {"BANDGATE_AUDIT_SEGMENT_DAYS": "-1"}}, "audit_segment_days"),
        ({"environ": {"BANDGATE_KEY_SCHEMA": "Keys; DROP"}}, "key_schema"),
        ({"environ": {"BANDGATE_TOKEN_PROCESS": "true", "BANDGATE_TOKEN_LISTEN": ""}}, "token_process"),
        ({"environ": {"BANDGATE_TOKEN_PROCESS": "true"}, "overrides": {"insecure": True}}, "token_process"),
    ],
)
def test_bad_values_name_the_setting(kwargs, named):
    with pytest.raises(ConfigError, match=named):
        load_config(**{"environ": {}, **kwargs})


def test_retention_per_family_overrides_the_default():
    cfg = load_config(environ={"BANDGATE_RETENTION_DAYS": "365", "BANDGATE_RETENTION": "heart=90, sleep=0"})
    days = cfg.retention_settings().days
    assert days == {**dict.fromkeys(days, 365.0), "heart": 90.0, "sleep": 0.0}
    assert len(days) == 8
    assert not GatewayConfig().retention_settings()  # by default nothing expires


def test_unknown_file_setting_refused(tmp_path):
    toml = tmp_path / "gw.toml"
    toml.write_text("max_frame_per_batch = 3\n")
    with pytest.raises(ConfigError, match="unknown setting 'max_frame_per_batch'"):
        load_config(file=toml, environ={})


def test_serve_refuses_to_start_on_bad_config(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("BANDGATE_COMPUTE_THREADS", "0")
    assert main(["serve", "--store", f"sqlite:///{tmp_path}/x.db"]) == 2
    assert "compute_threads" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["gw.example.com/x", "user@host", "has space", "host:443"])
def test_server_names_refuse_what_is_no_name(bad):
    with pytest.raises(ConfigError, match="server_names"):
        load_config(environ={"BANDGATE_SERVER_NAMES": f"ok.example.com,{bad}"})


def test_server_names_reach_the_development_server_certificate(tmp_path):
    import ipaddress

    from cryptography import x509

    from gateway.security.setup import prepare

    config = load_config(
        environ={"BANDGATE_SERVER_NAMES": " gw.example.com, 192.0.2.9 ,"},
        overrides={"state_dir": str(tmp_path / "state")},
    )
    assert config.server_hosts() == ["gw.example.com", "192.0.2.9"]
    setup = prepare(config)
    cert = x509.load_pem_x509_certificate(setup.state.server_cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "gw.example.com" in san.get_values_for_type(x509.DNSName)
    assert ipaddress.ip_address("192.0.2.9") in san.get_values_for_type(x509.IPAddress)
