"""Configuration: one frozen `Config` built from command-line flags and the environment.

Every setting is declared once in `SETTINGS` (flag, environment variable, type, default, help); the
argparse parser, `--help` and the environment lookup are all generated from that table, so they
cannot drift apart. A flag wins over its variable. Vast's variable names are used as they are.

Anything invalid raises `ConfigError` with one line naming the setting and what was expected;
`entrypoint.py` prints it and exits with code 2.
"""

from __future__ import annotations

import argparse
import math
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from backends.registry import BACKENDS, get_backend
from backends.spec import BackendSpec
from supervisor.rules import LogRules, split_patterns

VAST_REPORT_ADDR = "https://run.vast.ai"


class ConfigError(ValueError):
    """A setting is missing or malformed; the message names it and what was expected."""


# ---------------------------------------------------------------------------------------------
# Value parsers: text -> value, raising ValueError("expected ...") that names what was expected.


def _int(lo: int | None = None, hi: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise ValueError(_expected_range("an integer", lo, hi)) from None
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise ValueError(_expected_range("an integer", lo, hi))
        return value

    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise ValueError("expected a number of seconds >= 0") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError("expected a number of seconds >= 0")
    return value


def _positive(text: str) -> float:
    value = _seconds(text)
    if value <= 0:
        raise ValueError("expected a number > 0")
    return value


def _expected_range(what: str, lo: int | None, hi: int | None) -> str:
    if lo is not None and hi is not None:
        return f"expected {what} from {lo} to {hi}"
    if lo is not None:
        return f"expected {what} >= {lo}"
    return f"expected {what}"


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError("expected true or false")


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return value

    return parse


def _backend(text: str) -> str:
    name = text.strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"expected one of {', '.join(sorted(BACKENDS))}")
    return name


def _url(text: str) -> str:
    value = text.strip().rstrip("/")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("expected an http(s) URL such as http://127.0.0.1:5001")
    try:
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        raise ValueError("expected an http(s) URL with a valid port") from None
    return value


def _url_as_given(text: str) -> str:
    """An http(s) URL checked as `_url` does, kept as written: a trailing slash can matter to a server."""
    _url(text)
    return text.strip()


def _url_list(text: str) -> tuple[str, ...]:
    return tuple(_url(item) for item in text.split(",") if item.strip())


def _path(text: str) -> str:
    value = text.strip()
    if not value.startswith("/"):
        raise ValueError("expected a path starting with /")
    return value


def _text(text: str) -> str:
    return text.strip()


def _command(text: str) -> tuple[str, ...]:
    try:
        args = tuple(shlex.split(text))
    except ValueError as exc:
        raise ValueError(f"expected a shell-style command line ({exc})") from None
    return args


def _lines(text: str) -> tuple[str, ...]:
    """Newline-separated entries (blank lines skipped); a repeated flag's values are joined so too."""
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def _patterns(text: str) -> tuple[str, ...]:
    patterns = split_patterns(text)
    try:
        LogRules.build(load=patterns)  # compiled here so a bad regex is a config error (exit 2)
    except ValueError as exc:
        raise ValueError(f"expected substrings, re:<valid regex> or json:<key=value,...> ({exc})") from None
    return patterns


@dataclass(frozen=True)
class Setting:
    name: str  # Config field
    env: str | None
    flag: str
    parse: Callable[[str], Any]
    default: Any
    help: str
    group: str
    metavar: str | None = None
    is_switch: bool = False  # a flag without value (`--unsecured`) for a boolean setting
    repeatable: bool = False  # the flag may be given several times; its values are joined by newlines

    @property
    def label(self) -> str:
        return f"{self.env} ({self.flag})" if self.env else self.flag


SETTINGS: tuple[Setting, ...] = (
    # -- the model server
    Setting("backend", "BACKEND", "--backend", _backend, "generic",
            f"model server kind: {', '.join(sorted(BACKENDS))}", "model server"),
    Setting("model_cmd", "MODEL_CMD", "--model-cmd", _command, (),
            "command that starts the model server, as a shell-style string (or give it after `--`)", "model server"),
    Setting("before_cmds", "BEFORE_CMDS", "--before", _lines, (),
            "a provisioning step, run with /bin/sh before the model server (weights, packages); repeat the "
            "flag for more steps, in order; the variable takes one per line", "model server", "CMD", repeatable=True),
    Setting("provisioning_marker", "PROVISIONING_MARKER", "--provisioning-marker", _text, "/.provisioning",
            "wait in `provisioning` while this file exists (Vast's base images create it while they provision)",
            "model server", "PATH"),
    Setting("model_log", "MODEL_LOG", "--model-log", _text, None,
            "attach mode (no command given): the model server's log file to follow; supervised: a file the "
            "server's output is also written to (Vast's portal shows /var/log/portal/*.log)", "model server", "PATH"),
    Setting("model_log_max_bytes", "MODEL_LOG_MAX_BYTES", "--model-log-max-bytes", _int(4096, None), 50 * 1024 * 1024,
            "supervised mode: MODEL_LOG is rotated to MODEL_LOG.1 past this size", "model server", "N"),
    Setting("model_server_url", "MODEL_SERVER_URL", "--model-server-url", _url, None,
            "where the model server listens (default: the backend's)", "model server", "URL"),
    Setting("health_endpoint", "MODEL_HEALTH_ENDPOINT", "--health-endpoint", _path, None,
            "health path on the model server (default: the backend's)", "model server", "PATH"),
    Setting("load_patterns", "MODEL_LOAD_LOG_MSG", "--load-log-msg", _patterns, None,
            "log line(s) that mean 'loaded', newline-separated; substring, regex with re:, or JSON field tests "
            "with json: (json:message=Connected,target^=text_generation_router) "
            "(default: the backend's)", "model server", "TEXT"),
    Setting("error_patterns", "MODEL_ERROR_LOG_MSGS", "--error-log-msgs", _patterns, None,
            "log lines that mean 'broken, restart', newline-separated (default: the backend's)", "model server", "TEXT"),
    Setting("fatal_patterns", "MODEL_FATAL_LOG_MSGS", "--fatal-log-msgs", _patterns, None,
            "log lines that mean 'broken for good, give up', newline-separated (default: the backend's)",
            "model server", "TEXT"),
    Setting("info_patterns", "MODEL_INFO_LOG_MSGS", "--info-log-msgs", _patterns, None,
            "log lines worth an info event (downloads...), newline-separated (default: the backend's)",
            "model server", "TEXT"),
    # -- lifecycle
    Setting("stop_timeout", "STOP_TIMEOUT", "--stop-timeout", _seconds, 30.0,
            "seconds between SIGTERM and SIGKILL when stopping the model server", "lifecycle", "S"),
    Setting("drain_timeout", "DRAIN_TIMEOUT", "--drain-timeout", _seconds, 30.0,
            "seconds in-flight requests may take to finish on shutdown", "lifecycle", "S"),
    Setting("load_timeout", "LOAD_TIMEOUT", "--load-timeout", _seconds, 0.0,
            "restart a server not ready after this many seconds; 0 = wait forever (loads can take long)",
            "lifecycle", "S"),
    Setting("load_line_grace", "LOAD_LINE_GRACE", "--load-line-grace", _seconds, 30.0,
            "once the health path answers 200, wait this long (from the start) for the load line, then go on "
            "without it and warn; 0 = wait for the line for good", "lifecycle", "S"),
    Setting("health_interval", "HEALTH_INTERVAL", "--health-interval", _positive, 5.0,
            "seconds between health checks once ready", "lifecycle", "S"),
    Setting("health_timeout", "HEALTH_TIMEOUT", "--health-timeout", _positive, 5.0,
            "timeout of one health check", "lifecycle", "S"),
    Setting("unhealthy_timeout", "UNHEALTHY_TIMEOUT", "--unhealthy-timeout", _seconds, 60.0,
            "restart a server unhealthy for this long (supervised); 0 = never", "lifecycle", "S"),
    Setting("restart_delay", "RESTART_DELAY", "--restart-delay", _seconds, 1.0,
            "first restart delay; doubles per failure", "lifecycle", "S"),
    Setting("restart_max_delay", "RESTART_MAX_DELAY", "--restart-max-delay", _seconds, 60.0,
            "longest restart delay", "lifecycle", "S"),
    Setting("restart_reset_after", "RESTART_RESET_AFTER", "--restart-reset-after", _seconds, 600.0,
            "seconds of `ready` after which the backoff starts over", "lifecycle", "S"),
    Setting("max_failures", "MAX_FAILURES", "--max-failures", _int(0), 5,
            "consecutive failures without reaching ready before giving up (exit 1); 0 = never", "lifecycle", "N"),
    # -- HTTP
    Setting("host", "WORKER_HOST", "--host", _text, "0.0.0.0", "address to listen on", "http", "ADDR"),
    Setting("worker_port", "WORKER_PORT", "--port", _int(1, 65535), 3000, "port to listen on", "http", "PORT"),
    Setting("use_ssl", "USE_SSL", "--ssl", _bool, None,
            "serve HTTPS (default: on when reporting to Vast, as Vast's start script; else off)", "http",
            is_switch=True),
    Setting("ssl_cert", "SSL_CERT", "--ssl-cert", _text, "/etc/instance.crt", "TLS certificate (PEM)", "http", "PATH"),
    Setting("ssl_key", "SSL_KEY", "--ssl-key", _text, "/etc/instance.key", "TLS private key (PEM)", "http", "PATH"),
    Setting("sign_cert_url", "SIGN_CERT_URL", "--sign-cert-url", _url_as_given, "https://console.vast.ai/api/v0/sign_cert/",
            "with USE_SSL and no certificate files: where the CSR is signed (`?instance_id=CONTAINER_ID`)",
            "http", "URL"),
    Setting("sign_cert_backoff", "SIGN_CERT_BACKOFF", "--sign-cert-backoff", _seconds, 2.0,
            "seconds before the second of 5 signing tries, doubling", "http", "S"),
    Setting("unsecured", "UNSECURED", "--unsecured", _bool, False,
            "accept requests without a Vast signature (local, Kubernetes)", "http", is_switch=True),
    Setting("public_key_file", "PUBLIC_KEY_FILE", "--public-key", _text, None,
            "PEM file with the autoscaler's public key (default: fetched from REPORT_ADDR/pubkey/)", "http", "PATH"),
    Setting("signature_format", "SIGNATURE_FORMAT", "--signature-format",
            _choice("auto", "url", "sorted", "legacy"), "auto",
            "signed message: url (Vast 2026), sorted (2025), legacy (2024), or auto (try each)", "http"),
    Setting("replay_window", "REPLAY_WINDOW", "--replay-window", _int(0), 0,
            "refuse a signed (reqnum, signature) seen before, or a reqnum this far behind the newest; "
            "0 = off (url-only signatures carry no reqnum)", "http", "N"),
    Setting("max_body_bytes", "MAX_BODY_BYTES", "--max-body-bytes", _int(1), 64 * 1024 * 1024,
            "largest request body accepted (413 above)", "http", "N"),
    Setting("access_log", "ACCESS_LOG", "--access-log", _choice("info", "debug", "off"), "info",
            "level of the one-event-per-request access log", "http"),
    Setting("skip_url_check", "SKIP_URL_CHECK", "--skip-url-check", _bool, False,
            "secured mode without PUBLIC_IPADDR + VAST_TCP_PORT_<port>: accept a signature issued for any "
            "worker's url (off by default: shepherd refuses to start instead)", "http", is_switch=True),
    Setting("max_workload", "MAX_WORKLOAD", "--max-workload", _positive, 100_000.0,
            "largest workload one request may claim (routes may set less); larger claims are clamped", "http", "N"),
    # -- limits on the public port (SECURITY.md)
    Setting("max_connections", "MAX_CONNECTIONS", "--max-connections", _int(1), 1000,
            "client connections served at once; more are answered 503 and closed", "limits", "N"),
    Setting("max_connections_per_ip", "MAX_CONNECTIONS_PER_IP", "--max-connections-per-ip", _int(1), 256,
            "client connections one address may hold at once", "limits", "N"),
    Setting("header_timeout", "HEADER_TIMEOUT", "--header-timeout", _positive, 10.0,
            "seconds a client has to send a whole request head (and a TLS handshake)", "limits", "S"),
    Setting("body_timeout", "BODY_TIMEOUT", "--body-timeout", _positive, 60.0,
            "seconds a client has to send a whole request body once its head is in (408 after)", "limits", "S"),
    Setting("body_bytes_in_flight", "MAX_BODY_BYTES_IN_FLIGHT", "--max-body-bytes-in-flight", _int(1),
            256 * 1024 * 1024, "request body bytes held at once over all requests (503 above)", "limits", "N"),
    Setting("allow_h2c", "ALLOW_H2C", "--allow-h2c", _bool, False,
            "accept cleartext HTTP/2 (h2c upgrade, prior knowledge) on the public port", "limits", is_switch=True),
    Setting("stream_head_timeout", "STREAM_HEAD_TIMEOUT", "--stream-head-timeout", _positive, 600.0,
            "routes without a read timeout (streams, OpenAI routes): seconds the model server may take to start "
            "its answer, 504 after (a non-streamed completion's head comes only when it is done)", "limits", "S"),
    Setting("stream_idle_timeout", "STREAM_IDLE_TIMEOUT", "--stream-idle-timeout", _positive, 300.0,
            "routes without a read timeout: seconds of silence between two chunks before the answer is ended "
            "(a first token can wait long in the model server's own queue)", "limits", "S"),
    Setting("metrics_port", "METRICS_PORT", "--metrics-port", _int(0, 65535), 0,
            "admin listener for /status and /metrics (and the probes); 0 = none", "limits", "PORT"),
    Setting("metrics_host", "METRICS_HOST", "--metrics-host", _text, "127.0.0.1",
            "address of the admin listener (0.0.0.0 for a Prometheus in the cluster)", "limits", "ADDR"),
    # -- warm-up benchmark
    Setting("skip_benchmark", "SKIP_BENCHMARK", "--skip-benchmark", _bool, False,
            "do not benchmark; report MAX_PERF as the capacity", "benchmark", is_switch=True),
    Setting("max_perf", "MAX_PERF", "--max-perf", _seconds, None,
            "known capacity in workload units per second (with --skip-benchmark)", "benchmark", "N"),
    Setting("benchmark_runs", "BENCHMARK_RUNS", "--benchmark-runs", _int(1, 100), 3,
            "benchmark rounds", "benchmark", "N"),
    Setting("benchmark_concurrency", "BENCHMARK_CONCURRENCY", "--benchmark-concurrency", _int(1, 1000), 8,
            "requests per benchmark round (1 for non-parallel routes)", "benchmark", "N"),
    Setting("benchmark_cache", "BENCHMARK_CACHE", "--benchmark-cache", _text, ".shepherd-benchmark.json",
            "JSON cache of benchmark results (keyed by backend, model, GPUs, settings)", "benchmark", "PATH"),
    # -- probes
    Setting("workspace", "WORKSPACE_DIR", "--workspace", _text, "/workspace",
            "volume whose disk usage is reported (/ when it does not exist)", "probes", "PATH"),
    Setting("probe_interval", "PROBE_INTERVAL", "--probe-interval", _positive, 2.0,
            "seconds between GPU, host and model-metrics samples", "probes", "S"),
    # -- the autoscaler
    Setting("report_addr", "REPORT_ADDR", "--report-addr", _url_list, (),
            "autoscaler address(es), comma-separated, tried in order "
            f"(default {VAST_REPORT_ADDR} when CONTAINER_ID is set)", "autoscaler", "URLS"),
    Setting("container_id", "CONTAINER_ID", "--container-id", _text, None, "Vast worker id", "autoscaler", "ID"),
    Setting("master_token", "MASTER_TOKEN", "--master-token", _text, None,
            "Vast master token sent with reports", "autoscaler", "TOKEN"),
    Setting("public_ipaddr", "PUBLIC_IPADDR", "--public-ip", _text, None,
            "public address of this machine (for the reported url)", "autoscaler", "ADDR"),
    Setting("public_port", None, "--public-port", _int(1, 65535), None,
            "public port mapped to WORKER_PORT (env: VAST_TCP_PORT_<WORKER_PORT>)", "autoscaler", "PORT"),
    # -- logging
    Setting("log_format", "LOG_FORMAT", "--log-format", _choice("auto", "json", "console"), "auto",
            "json, console, or auto (console on a terminal)", "logging"),
    Setting("log_level", "LOG_LEVEL", "--log-level", _choice("debug", "info", "warning", "error"), "info",
            "lowest level logged", "logging"),
)


@dataclass(frozen=True)
class Config:
    backend: str
    spec: BackendSpec
    command: tuple[str, ...]  # empty in attach mode
    model_log: str | None
    model_log_max_bytes: int
    before_cmds: tuple[str, ...]
    provisioning_marker: str
    model_server_url: str
    health_endpoint: str
    health_fallback: str | None
    load_patterns: tuple[str, ...]
    error_patterns: tuple[str, ...]
    fatal_patterns: tuple[str, ...]
    info_patterns: tuple[str, ...]
    stop_timeout: float
    drain_timeout: float
    load_timeout: float
    load_line_grace: float
    health_interval: float
    health_timeout: float
    unhealthy_timeout: float
    restart_delay: float
    restart_max_delay: float
    restart_reset_after: float
    max_failures: int
    host: str
    worker_port: int
    use_ssl: bool
    ssl_cert: str
    ssl_key: str
    sign_cert_url: str
    sign_cert_backoff: float
    unsecured: bool
    report_addr: tuple[str, ...]
    container_id: str | None
    master_token: str | None
    public_ipaddr: str | None
    public_port: int | None
    public_key_file: str | None
    signature_format: str
    replay_window: int
    max_body_bytes: int
    access_log: str
    skip_url_check: bool
    max_workload: float
    max_connections: int
    max_connections_per_ip: int
    header_timeout: float
    body_timeout: float
    body_bytes_in_flight: int
    allow_h2c: bool
    stream_head_timeout: float
    stream_idle_timeout: float
    metrics_port: int
    metrics_host: str
    skip_benchmark: bool
    max_perf: float | None
    benchmark_runs: int
    benchmark_concurrency: int
    benchmark_cache: str
    workspace: str
    probe_interval: float
    log_format: str
    log_level: str
    environ: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    @property
    def attach(self) -> bool:
        return not self.command

    @property
    def reporting(self) -> bool:
        return bool(self.report_addr)

    @property
    def public_url(self) -> str | None:
        """This worker's url as the autoscaler knows it (Vast: PUBLIC_IPADDR + VAST_TCP_PORT_<port>)."""
        if not self.public_ipaddr or not self.public_port:
            return None
        return f"{'https' if self.use_ssl else 'http'}://{self.public_ipaddr}:{self.public_port}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shepherd",
        description="Supervise a model server, proxy and queue its requests, report its load. "
        "Every option can also be set by the environment variable shown; a flag wins over its variable.",
        usage="%(prog)s [--backend NAME] [options] [-- MODEL_SERVER_COMMAND ...]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Without a command (after --, MODEL_CMD, or the backend's default), shepherd attaches: "
        "it follows MODEL_LOG and proxies to a server started by someone else.\n"
        "Exit codes: 0 shut down on request, 1 gave up (crash loop, fatal model error), 2 configuration error.",
    )
    groups: dict[str, argparse._ArgumentGroup] = {}
    for s in SETTINGS:
        group = groups.setdefault(s.group, parser.add_argument_group(s.group))
        env = f"env {s.env}" if s.env else ""
        default = "" if s.default in (None, ()) else f"default {_show(s.default)}"
        extra = "; ".join(x for x in (env, default) if x)
        text = f"{s.help} [{extra}]" if extra else s.help
        if s.is_switch:
            group.add_argument(s.flag, dest=s.name, nargs="?", const="true", default=None, metavar="BOOL", help=text)
        elif s.repeatable:
            group.add_argument(s.flag, dest=s.name, action="append", default=None, metavar=s.metavar, help=text)
        else:
            group.add_argument(s.flag, dest=s.name, default=None, metavar=s.metavar, help=text)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="model server command, after --")
    return parser


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def load_config(argv: Sequence[str], environ: Mapping[str, str]) -> Config:
    """Build the Config from flags and environment. Raises ConfigError (exit 2) on any bad value."""
    parser = build_parser()
    parser.exit_on_error = False
    try:
        ns, unknown = parser.parse_known_args(list(argv))
    except argparse.ArgumentError as exc:
        raise ConfigError(f"{exc}") from None
    if unknown:
        raise ConfigError(f"unknown option {unknown[0]!r}: expected one of the options in --help")

    values: dict[str, Any] = {}
    for s in SETTINGS:
        raw = getattr(ns, s.name)
        if isinstance(raw, list):  # a repeatable flag
            raw = "\n".join(raw)
        if raw is None and s.env is not None and s.env in environ:
            raw = environ[s.env]
        if raw is None:
            values[s.name] = s.default
            continue
        try:
            values[s.name] = s.parse(str(raw))
        except ValueError as exc:
            raise ConfigError(f"{s.label}: {exc}, got {str(raw)!r}") from None

    port = values["worker_port"]
    if values["public_port"] is None and f"VAST_TCP_PORT_{port}" in environ:
        env_name = f"VAST_TCP_PORT_{port}"
        try:
            values["public_port"] = _int(1, 65535)(environ[env_name])
        except ValueError as exc:
            raise ConfigError(f"{env_name}: {exc}, got {environ[env_name]!r}") from None

    spec = get_backend(values["backend"])
    if ns.command and ns.command[0] != "--":
        raise ConfigError(f"unexpected argument {ns.command[0]!r}: put the model server command after --")
    command = tuple(ns.command[1:])
    url = values["model_server_url"] or spec.default_url
    if not command:
        command = values["model_cmd"]
    if not command and not values["model_log"] and spec.default_log and not spec.default_command:
        values["model_log"] = spec.default_log
    if not command and not values["model_log"] and spec.default_command:
        host, port_ = _host_port(url)
        command = tuple(arg.format(host=host, port=port_) for arg in spec.default_command)
    if not command and not values["model_log"]:
        raise ConfigError(
            f"BACKEND ({values['backend']}) has no default command: expected a model server command "
            "after --, MODEL_CMD, or MODEL_LOG to attach to a running server"
        )

    report_addr = values["report_addr"]
    if not report_addr and values["container_id"]:
        report_addr = (VAST_REPORT_ADDR,)

    if not values["unsecured"] and not values["public_key_file"] and not report_addr:
        raise ConfigError(
            "UNSECURED (--unsecured): requests must be signed but there is no key source: expected "
            "REPORT_ADDR or CONTAINER_ID (key from the autoscaler), PUBLIC_KEY_FILE, or UNSECURED=true"
        )
    if not values["unsecured"] and not values["skip_url_check"] and not (
        values["public_ipaddr"] and values["public_port"]
    ):
        # Without the url, any signature Vast issued for any worker of any endpoint would pass.
        raise ConfigError(
            f"PUBLIC_IPADDR and VAST_TCP_PORT_{port} (--public-ip, --public-port): secured mode must know the "
            "url the autoscaler signs for this worker; set both, or SKIP_URL_CHECK=true to accept any worker's url"
        )
    if values["body_bytes_in_flight"] < values["max_body_bytes"]:
        raise ConfigError(
            f"MAX_BODY_BYTES_IN_FLIGHT (--max-body-bytes-in-flight): expected at least MAX_BODY_BYTES "
            f"({values['max_body_bytes']}), got {values['body_bytes_in_flight']}"
        )
    if values["metrics_port"] and values["metrics_port"] == port:
        raise ConfigError(f"METRICS_PORT (--metrics-port): expected a port other than WORKER_PORT ({port})")
    if values["skip_benchmark"] and not values["max_perf"]:
        raise ConfigError("MAX_PERF (--max-perf): expected a capacity > 0 when SKIP_BENCHMARK is set")

    def pick(name: str, default: tuple[str, ...]) -> tuple[str, ...]:
        return default if values[name] is None else values[name]

    return Config(
        backend=values["backend"],
        spec=spec,
        command=command,
        model_log=values["model_log"] or None,
        model_log_max_bytes=values["model_log_max_bytes"],
        before_cmds=values["before_cmds"],
        provisioning_marker=values["provisioning_marker"],
        model_server_url=url,
        health_endpoint=values["health_endpoint"] or spec.health_path,
        # A path the user chose is the one asked; the backend's fallback stands in for its own default.
        health_fallback=None if values["health_endpoint"] else spec.health_fallback,
        load_patterns=pick("load_patterns", spec.load_patterns),
        error_patterns=pick("error_patterns", spec.error_patterns),
        fatal_patterns=pick("fatal_patterns", spec.fatal_patterns),
        info_patterns=pick("info_patterns", spec.info_patterns),
        stop_timeout=values["stop_timeout"],
        drain_timeout=values["drain_timeout"],
        load_timeout=values["load_timeout"],
        load_line_grace=values["load_line_grace"],
        health_interval=values["health_interval"],
        health_timeout=values["health_timeout"],
        unhealthy_timeout=values["unhealthy_timeout"],
        restart_delay=values["restart_delay"],
        restart_max_delay=values["restart_max_delay"],
        restart_reset_after=values["restart_reset_after"],
        max_failures=values["max_failures"],
        host=values["host"],
        worker_port=port,
        # Vast's start script serves HTTPS unless told otherwise; a worker that reports to Vast does too.
        use_ssl=values["use_ssl"] if values["use_ssl"] is not None else bool(report_addr),
        sign_cert_url=values["sign_cert_url"],
        sign_cert_backoff=values["sign_cert_backoff"],
        ssl_cert=values["ssl_cert"],
        ssl_key=values["ssl_key"],
        unsecured=values["unsecured"],
        report_addr=report_addr,
        container_id=values["container_id"],
        master_token=values["master_token"],
        public_ipaddr=values["public_ipaddr"],
        public_port=values["public_port"],
        public_key_file=values["public_key_file"] or None,
        signature_format=values["signature_format"],
        replay_window=values["replay_window"],
        max_body_bytes=values["max_body_bytes"],
        access_log=values["access_log"],
        skip_url_check=values["skip_url_check"],
        max_workload=values["max_workload"],
        max_connections=values["max_connections"],
        max_connections_per_ip=min(values["max_connections_per_ip"], values["max_connections"]),
        header_timeout=values["header_timeout"],
        body_timeout=values["body_timeout"],
        body_bytes_in_flight=values["body_bytes_in_flight"],
        allow_h2c=values["allow_h2c"],
        stream_head_timeout=values["stream_head_timeout"],
        stream_idle_timeout=values["stream_idle_timeout"],
        metrics_port=values["metrics_port"],
        metrics_host=values["metrics_host"],
        skip_benchmark=values["skip_benchmark"],
        max_perf=values["max_perf"],
        benchmark_runs=values["benchmark_runs"],
        benchmark_concurrency=values["benchmark_concurrency"],
        benchmark_cache=values["benchmark_cache"],
        workspace=values["workspace"],
        probe_interval=values["probe_interval"],
        log_format=values["log_format"],
        log_level=values["log_level"],
        environ=dict(environ),
    )


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or (443 if parts.scheme == "https" else 80)
