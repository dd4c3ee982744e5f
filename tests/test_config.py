"""Tests for supervisor.config: every bad value is one ConfigError naming the setting, Vast's names and
defaults, precedence of flags over variables, the model command's sources, and --help."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

import backends.demo as DEMO_MODULE
from backends.demo import SPEC as DEMO
from backends.registry import BACKENDS
from supervisor.config import SETTINGS, VAST_REPORT_ADDR, ConfigError, build_parser, load_config

# Requests are signed unless UNSECURED: a key source is needed; a key file is the one with no side effects.
# Secured mode also needs this worker's public url, or the explicit opt-out (tested on its own below).
KEY = {"PUBLIC_KEY_FILE": "/etc/autoscaler-key.pem", "SKIP_URL_CHECK": "true"}
ATTACH = {**KEY, "MODEL_LOG": "/var/log/model.log"}  # the least a generic backend needs


def load(argv: list[str] | None = None, **env: str):
    return load_config(argv or [], {**KEY, **env})


# ---------------------------------------------------------------------------------------------
# Errors (exit code 2): one line naming the setting (env var and flag) and what was expected.

BAD_VALUES = [
    # (env var, flag, value, text that says what was expected)
    ("BACKEND", "--backend", "no-such-server", f"expected one of {', '.join(sorted(BACKENDS))}"),
    ("WORKER_PORT", "--port", "abc", "expected an integer from 1 to 65535"),
    ("WORKER_PORT", "--port", "70000", "expected an integer from 1 to 65535"),
    ("WORKER_PORT", "--port", "0", "expected an integer from 1 to 65535"),
    ("STOP_TIMEOUT", "--stop-timeout", "-1", "expected a number of seconds >= 0"),
    ("DRAIN_TIMEOUT", "--drain-timeout", "-5", "expected a number of seconds >= 0"),
    ("STOP_TIMEOUT", "--stop-timeout", "nan", "expected a number of seconds >= 0"),
    ("LOAD_TIMEOUT", "--load-timeout", "inf", "expected a number of seconds >= 0"),
    ("RESTART_DELAY", "--restart-delay", "-inf", "expected a number of seconds >= 0"),
    ("DRAIN_TIMEOUT", "--drain-timeout", "soon", "expected a number of seconds >= 0"),
    ("HEALTH_INTERVAL", "--health-interval", "0", "expected a number > 0"),
    ("HEALTH_TIMEOUT", "--health-timeout", "0", "expected a number > 0"),
    ("HEALTH_INTERVAL", "--health-interval", "nan", "expected"),
    ("MAX_FAILURES", "--max-failures", "-1", "expected an integer >= 0"),
    ("USE_SSL", "--ssl", "maybe", "expected true or false"),
    ("UNSECURED", "--unsecured", "sometimes", "expected true or false"),
    ("MODEL_SERVER_URL", "--model-server-url", "localhost:5001", "expected an http(s) URL"),
    ("MODEL_SERVER_URL", "--model-server-url", "ftp://127.0.0.1:5001", "expected an http(s) URL"),
    ("MODEL_SERVER_URL", "--model-server-url", "http://127.0.0.1:99999", "valid port"),
    ("MODEL_HEALTH_ENDPOINT", "--health-endpoint", "health", "expected a path starting with /"),
    ("REPORT_ADDR", "--report-addr", "https://run.vast.ai,not a url", "expected an http(s) URL"),
    ("MODEL_CMD", "--model-cmd", "python -c 'print(1)", "expected a shell-style command line"),
    ("MODEL_ERROR_LOG_MSGS", "--error-log-msgs", "re:(", "expected"),
    ("MODEL_LOAD_LOG_MSG", "--load-log-msg", "ok line\nre:[unclosed", "expected"),
    ("MODEL_FATAL_LOG_MSGS", "--fatal-log-msgs", "re:", "expected"),
    ("MODEL_INFO_LOG_MSGS", "--info-log-msgs", "re:a{2,1}", "expected"),
    ("LOG_FORMAT", "--log-format", "xml", "expected one of auto, json, console"),
    ("LOG_LEVEL", "--log-level", "loud", "expected one of debug, info, warning, error"),
]


def _check_message(err: ConfigError, *needles: str) -> None:
    text = str(err)
    assert "\n" not in text, "a config error is one line"
    for needle in needles:
        assert needle in text, f"{needle!r} not in {text!r}"


@pytest.mark.parametrize(("env", "flag", "value", "expected"), BAD_VALUES)
def test_bad_env_value_names_variable_flag_and_expectation(env: str, flag: str, value: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config([], {**ATTACH, env: value})
    _check_message(info.value, env, flag, expected, repr(value))


@pytest.mark.parametrize(("env", "flag", "value", "expected"), BAD_VALUES)
def test_bad_flag_value_names_variable_flag_and_expectation(env: str, flag: str, value: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config([f"{flag}={value}"], dict(ATTACH))
    _check_message(info.value, env, flag, expected)


def test_invalid_regex_message_names_the_pattern() -> None:
    with pytest.raises(ConfigError) as info:
        load([], **ATTACH, MODEL_ERROR_LOG_MSGS="CUDA out of memory\nre:(")
    _check_message(info.value, "MODEL_ERROR_LOG_MSGS", "re:(", "regex")


def test_valid_regex_patterns_are_accepted() -> None:
    config = load([], **ATTACH, MODEL_ERROR_LOG_MSGS=r"re:^ERROR \d+" + "\nCUDA out of memory")
    assert config.error_patterns == (r"re:^ERROR \d+", "CUDA out of memory")


def test_bad_vast_public_port_names_the_variable() -> None:
    with pytest.raises(ConfigError) as info:
        load([], **ATTACH, VAST_TCP_PORT_3000="abc")
    _check_message(info.value, "VAST_TCP_PORT_3000", "expected an integer from 1 to 65535")


def test_unknown_flag() -> None:
    with pytest.raises(ConfigError) as info:
        load(["--bogus-flag"], **ATTACH)
    _check_message(info.value, "--bogus-flag", "expected")


def test_unknown_flag_with_value() -> None:
    with pytest.raises(ConfigError) as info:
        load(["--bogus=1"], **ATTACH)
    _check_message(info.value, "--bogus", "expected")


def test_flag_missing_its_value() -> None:
    with pytest.raises(ConfigError) as info:
        load(["--port"], **ATTACH)
    _check_message(info.value, "--port")


def test_positional_argument_without_double_dash() -> None:
    with pytest.raises(ConfigError) as info:
        load(["python", "server.py"], **ATTACH)
    _check_message(info.value, "'python'", "after --")


def test_positional_before_double_dash() -> None:
    with pytest.raises(ConfigError) as info:
        load(["extra", "--", "python", "server.py"], **ATTACH)
    _check_message(info.value, "'extra'", "after --")


def test_generic_backend_without_command_or_log() -> None:
    with pytest.raises(ConfigError) as info:
        load([])
    _check_message(info.value, "BACKEND", "generic", "expected", "MODEL_CMD", "MODEL_LOG", "--")


@pytest.mark.parametrize("source", [{"UNSECURED": "true"}, {"CONTAINER_ID": "7"},
                                    {"REPORT_ADDR": "http://autoscaler.test"}, KEY])
def test_signed_requests_need_a_key_source(source: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_config([], {"MODEL_LOG": "/m.log"})
    _check_message(info.value, "UNSECURED", "expected", "PUBLIC_KEY_FILE", "REPORT_ADDR")
    load_config([], {"MODEL_LOG": "/m.log", "SKIP_URL_CHECK": "true", **source})  # any one source is enough


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


# ---------------------------------------------------------------------------------------------
# Defaults and Vast's names.


def test_defaults_in_attach_mode() -> None:
    config = load([], **ATTACH)
    assert config.backend == "generic"
    assert config.attach is True
    assert config.command == ()
    assert config.model_log == "/var/log/model.log"
    assert config.worker_port == 3000
    assert config.host == "0.0.0.0"
    assert config.use_ssl is False and config.unsecured is False
    assert config.ssl_cert == "/etc/instance.crt" and config.ssl_key == "/etc/instance.key"
    assert config.report_addr == () and config.reporting is False
    assert config.public_url is None
    assert config.model_server_url == "http://127.0.0.1:18000"
    assert config.health_endpoint == "/health"
    assert config.stop_timeout == 30.0 and config.drain_timeout == 30.0
    assert config.health_interval == 5.0 and config.max_failures == 5
    assert config.restart_delay == 1.0 and config.restart_max_delay == 60.0
    assert config.restart_reset_after == 600.0


def test_vast_names_are_honoured() -> None:
    config = load(
        [],
        BACKEND="demo",
        MODEL_LOG="/tmp/m.log",
        MODEL_SERVER_URL="http://127.0.0.1:8080/",
        MODEL_HEALTH_ENDPOINT="/healthz",
        MODEL_LOAD_LOG_MSG="Connected",
        MODEL_ERROR_LOG_MSGS="CUDA out of memory\nRuntimeError",
        MODEL_INFO_LOG_MSGS="Downloading\\nFetching",
        WORKER_PORT="8443",
        USE_SSL="true",
        UNSECURED="yes",
        MASTER_TOKEN="tok-123",
        CONTAINER_ID="4242",
    )
    assert config.backend == "demo" and config.spec is DEMO
    assert config.model_log == "/tmp/m.log"
    assert config.model_server_url == "http://127.0.0.1:8080"  # trailing slash dropped
    assert config.health_endpoint == "/healthz"
    assert config.load_patterns == ("Connected",)
    assert config.error_patterns == ("CUDA out of memory", "RuntimeError")
    assert config.info_patterns == ("Downloading", "Fetching")
    assert config.worker_port == 8443
    assert config.use_ssl is True and config.unsecured is True
    assert config.master_token == "tok-123"
    assert config.container_id == "4242"


@pytest.mark.parametrize(("text", "value"), [("1", True), ("TRUE", True), ("on", True), ("no", False),
                                             ("0", False), ("", False), (" False ", False)])
def test_bool_spellings(text: str, value: bool) -> None:
    assert load([], **ATTACH, USE_SSL=text).use_ssl is value


def test_report_addr_comma_list_in_order() -> None:
    config = load([], **ATTACH, REPORT_ADDR="https://a.example, http://b.example:8080/ ,")
    assert config.report_addr == ("https://a.example", "http://b.example:8080")
    assert config.reporting is True


def test_container_id_defaults_report_addr_to_vast() -> None:
    config = load([], **ATTACH, CONTAINER_ID="123")
    assert config.report_addr == (VAST_REPORT_ADDR,) == ("https://run.vast.ai",)
    assert config.reporting is True


def test_explicit_report_addr_wins_over_container_default() -> None:
    config = load([], **ATTACH, CONTAINER_ID="123", REPORT_ADDR="http://autoscaler.local:9000")
    assert config.report_addr == ("http://autoscaler.local:9000",)


def test_public_url_from_vast_port_mapping() -> None:
    config = load([], **ATTACH, PUBLIC_IPADDR="203.0.113.7", VAST_TCP_PORT_3000="41000")
    assert config.public_port == 41000
    assert config.public_url == "http://203.0.113.7:41000"


def test_public_url_is_https_with_ssl() -> None:
    config = load([], **ATTACH, PUBLIC_IPADDR="203.0.113.7", VAST_TCP_PORT_3000="41000", USE_SSL="1")
    assert config.public_url == "https://203.0.113.7:41000"


def test_public_port_follows_worker_port() -> None:
    env = {**ATTACH, "PUBLIC_IPADDR": "203.0.113.7", "VAST_TCP_PORT_3000": "41000", "VAST_TCP_PORT_8080": "42000"}
    config = load_config([], {**env, "WORKER_PORT": "8080"})
    assert config.public_url == "http://203.0.113.7:42000"
    # The mapping of another port is not this worker's.
    config = load_config([], {**ATTACH, "PUBLIC_IPADDR": "203.0.113.7", "VAST_TCP_PORT_3000": "41000",
                              "WORKER_PORT": "8080"})
    assert config.public_port is None and config.public_url is None


def test_public_port_flag_wins_over_vast_mapping() -> None:
    config = load(["--public-port", "5555"], **ATTACH, PUBLIC_IPADDR="h", VAST_TCP_PORT_3000="41000")
    assert config.public_url == "http://h:5555"


# ---------------------------------------------------------------------------------------------
# Precedence: a flag wins over its variable.


@pytest.mark.parametrize(
    ("flag_args", "env", "field", "value"),
    [
        (["--port", "5000"], {"WORKER_PORT": "4000"}, "worker_port", 5000),
        (["--ssl"], {"USE_SSL": "false"}, "use_ssl", True),
        (["--ssl", "false"], {"USE_SSL": "true"}, "use_ssl", False),
        (["--unsecured"], {"UNSECURED": "0"}, "unsecured", True),
        (["--stop-timeout=2.5"], {"STOP_TIMEOUT": "9"}, "stop_timeout", 2.5),
        (["--backend", "demo"], {"BACKEND": "generic"}, "backend", "demo"),
        (["--model-log", "/a.log"], {"MODEL_LOG": "/b.log"}, "model_log", "/a.log"),
        (["--report-addr", "http://x.test"], {"REPORT_ADDR": "http://y.test"}, "report_addr", ("http://x.test",)),
        (["--error-log-msgs", "flag err"], {"MODEL_ERROR_LOG_MSGS": "env err"}, "error_patterns", ("flag err",)),
    ],
)
def test_flag_wins_over_variable(flag_args: list[str], env: dict[str, str], field: str, value: object) -> None:
    config = load_config(flag_args, {**ATTACH, **env})
    assert getattr(config, field) == value


def test_a_bad_variable_is_ignored_when_its_flag_is_given() -> None:
    # The variable is never read when the flag is there, so its bad value cannot stop the start.
    assert load(["--port", "5000"], **ATTACH, WORKER_PORT="abc").worker_port == 5000


def test_variable_used_when_flag_absent() -> None:
    assert load([], **ATTACH, WORKER_PORT="4000").worker_port == 4000


# ---------------------------------------------------------------------------------------------
# The model command.


def test_command_after_double_dash() -> None:
    config = load(["--port", "3001", "--", "python", "-m", "vllm", "--port", "8000"])
    assert config.command == ("python", "-m", "vllm", "--port", "8000")
    assert config.attach is False
    assert config.worker_port == 3001  # the command's own --port is not ours


def test_later_double_dash_inside_command_is_kept() -> None:
    config = load(["--", "launcher", "--", "--bogus", "x"])
    assert config.command == ("launcher", "--", "--bogus", "x")


def test_model_cmd_is_shell_split() -> None:
    config = load([], MODEL_CMD="text-generation-launcher --model-id 'my org/model' --port 8000")
    assert config.command == ("text-generation-launcher", "--model-id", "my org/model", "--port", "8000")


def test_double_dash_command_wins_over_model_cmd() -> None:
    config = load(["--", "a", "b"], MODEL_CMD="c d")
    assert config.command == ("a", "b")


def test_model_cmd_flag_wins_over_variable() -> None:
    config = load(["--model-cmd", "a 'b c'"], MODEL_CMD="x y")
    assert config.command == ("a", "b c")


def test_demo_default_command_filled_from_model_server_url() -> None:
    config = load([], BACKEND="demo", MODEL_SERVER_URL="http://127.0.0.2:6001")
    demo_server = str(Path(DEMO_MODULE.__file__).with_name("demo_server.py"))
    assert config.command == (sys.executable, demo_server, "--host", "127.0.0.2", "--port", "6001")
    assert "{host}" not in " ".join(config.command) and "{port}" not in " ".join(config.command)
    assert config.attach is False


def test_demo_default_command_uses_backend_url() -> None:
    config = load(["--backend", "demo"])
    assert config.model_server_url == DEMO.default_url == "http://127.0.0.1:5001"
    assert config.command[-4:] == ("--host", "127.0.0.1", "--port", "5001")


def test_attach_mode_when_only_model_log() -> None:
    config = load([], MODEL_LOG="/workspace/model.log", MODEL_SERVER_URL="http://127.0.0.1:8000")
    assert config.attach is True and config.command == ()
    assert config.model_log == "/workspace/model.log"


def test_demo_with_model_log_attaches_instead_of_default_command() -> None:
    config = load([], BACKEND="demo", MODEL_LOG="/workspace/model.log")
    assert config.attach is True and config.command == ()


def test_backend_patterns_used_unless_overridden() -> None:
    config = load([], BACKEND="demo")
    assert config.load_patterns == DEMO.load_patterns
    assert config.error_patterns == DEMO.error_patterns
    assert config.fatal_patterns == DEMO.fatal_patterns
    assert config.info_patterns == DEMO.info_patterns
    assert config.health_endpoint == DEMO.health_path

    override = load([], BACKEND="demo", MODEL_LOAD_LOG_MSG="re:^up$", MODEL_HEALTH_ENDPOINT="/ok")
    assert override.load_patterns == ("re:^up$",)
    assert override.error_patterns == DEMO.error_patterns  # the others stay the backend's
    assert override.health_endpoint == "/ok"


def test_environ_is_kept_as_a_copy() -> None:
    env = {**ATTACH, "HF_TOKEN": "hf_x"}
    config = load_config([], env)
    env["HF_TOKEN"] = "changed"
    assert config.environ["HF_TOKEN"] == "hf_x"


# ---------------------------------------------------------------------------------------------
# --help


def test_help_mentions_every_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "100")
    text = re.sub(r"\s+", " ", build_parser().format_help())
    for setting in SETTINGS:
        assert setting.flag in text, setting.flag
        if setting.env is not None:
            assert f"env {setting.env}" in text, setting.env
    assert "VAST_TCP_PORT_<WORKER_PORT>" in text
    for name in ("BACKEND", "MODEL_LOG", "MODEL_SERVER_URL", "MODEL_HEALTH_ENDPOINT", "MODEL_LOAD_LOG_MSG",
                 "MODEL_ERROR_LOG_MSGS", "MODEL_INFO_LOG_MSGS", "WORKER_PORT", "USE_SSL", "UNSECURED",
                 "REPORT_ADDR", "CONTAINER_ID", "MASTER_TOKEN", "PUBLIC_IPADDR"):
        assert f"env {name}" in text, name
    assert "default 3000" in text


# ---------------------------------------------------------------------------------------------
# Secured mode must know which url the autoscaler signs for this worker (SECURITY.md, finding 4).


def test_secured_mode_without_the_public_url_refuses_to_start() -> None:
    env = {"MODEL_LOG": "/m.log", "PUBLIC_KEY_FILE": "/k.pem"}
    with pytest.raises(ConfigError) as info:
        load_config([], env)
    _check_message(info.value, "PUBLIC_IPADDR", "VAST_TCP_PORT_3000", "SKIP_URL_CHECK")
    with pytest.raises(ConfigError):  # half of it is not enough
        load_config([], {**env, "PUBLIC_IPADDR": "203.0.113.7"})
    config = load_config([], {**env, "PUBLIC_IPADDR": "203.0.113.7", "VAST_TCP_PORT_3000": "41000"})
    assert config.public_url == "http://203.0.113.7:41000"
    assert load_config([], {**env, "SKIP_URL_CHECK": "true"}).public_url is None
    assert load_config([], {"MODEL_LOG": "/m.log", "UNSECURED": "true"}).public_url is None  # nothing to check


def test_limits_have_safe_defaults_and_are_checked() -> None:
    config = load([], **ATTACH)
    assert config.max_connections == 1000 and config.max_connections_per_ip == 256
    assert config.header_timeout == 10.0 and config.body_timeout == 60.0
    assert config.body_bytes_in_flight >= config.max_body_bytes
    assert config.allow_h2c is False and config.metrics_port == 0 and config.metrics_host == "127.0.0.1"
    with pytest.raises(ConfigError) as info:
        load([], **ATTACH, MAX_BODY_BYTES="1000", MAX_BODY_BYTES_IN_FLIGHT="999")
    _check_message(info.value, "MAX_BODY_BYTES_IN_FLIGHT", "expected", "MAX_BODY_BYTES")
    with pytest.raises(ConfigError) as info:
        load([], **ATTACH, METRICS_PORT="3000")
    _check_message(info.value, "METRICS_PORT", "WORKER_PORT")
    assert load([], **ATTACH, MAX_CONNECTIONS="10").max_connections_per_ip == 10  # never above the total


def test_tls_follows_vasts_default_when_reporting_to_vast() -> None:
    """Vast's start script serves HTTPS unless USE_SSL says otherwise; so does a worker that reports to Vast."""
    vast = {"CONTAINER_ID": "7", "PUBLIC_IPADDR": "203.0.113.7", "VAST_TCP_PORT_3000": "41000"}
    assert load_config(["--backend", "demo"], vast).use_ssl is True
    assert load_config(["--backend", "demo"], {**vast, "USE_SSL": "false"}).use_ssl is False
    assert load_config(["--backend", "demo", "--unsecured"], {}).use_ssl is False  # not reporting: plain HTTP
    config = load_config(["--backend", "demo"], {**vast, "SIGN_CERT_URL": "https://signer.example/sign_cert/"})
    assert config.sign_cert_url == "https://signer.example/sign_cert/"  # the trailing slash is kept
