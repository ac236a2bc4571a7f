"""``edgefleet`` verbs of the server: run it, bootstrap it, and talk to its API.

Registered through ``add_parser(subparsers)`` (see ``edgefleet.cli``), which
this package's ``__init__`` assembles from ``ops`` (local operations on the
database and files) and ``remote`` (HTTP API verbs through
``server.client.ApiClient``). The package imports only the standard library
and ``edgefleet.console`` at import time; FastAPI, SQLAlchemy and httpx are
imported inside the handlers, so ``edgefleet --help`` stays fast and the
agent's install never needs them.

Verbs:

* ``server run|mqtt|init|migrate``: operate a server from its settings
  (database access, no token): ``run`` serves the API with the job worker and
  the MQTT service, ``mqtt`` runs only the MQTT service (a separate worker),
  ``init`` creates the schema and prints a new admin token.
* ``tokens create|ls|revoke``, ``publish``, ``models ls|show|sign|release``,
  ``jobs show``, ``devices enroll|ls|show|rm|desired``, ``deploy``,
  ``deployments ls``, ``telemetry show``, ``audit verify|ls``: API clients
  (``--server URL`` or ``EDGEFLEET_SERVER``; ``--token`` or ``EDGEFLEET_TOKEN``).

Every verb has ``--json`` (one JSON object on stdout) and readable rich
output. Exit status: 0 success; 1 the server refused the request or the input
is unusable; 10 ``audit verify`` found tampering; 30 the server is unreachable.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from edgefleet.console import positive_int
from server.cli.drift import (
    _audit_feedback,
    add_alerts_parser,
    add_drift_parser,
    add_retrain_parser,
)
from server.cli.ops import (
    _server_broker_config,
    _server_init,
    _server_migrate,
    _server_mqtt,
    _server_run,
    uvicorn_config,
)
from server.cli.remote import (
    EXIT_TAMPERED,
    _audit_ls,
    _audit_verify,
    _deploy,
    _deployments_ls,
    _devices_desired,
    _devices_enroll,
    _devices_ls,
    _devices_rm,
    _devices_show,
    _jobs_show,
    _models_ls,
    _models_release,
    _models_show,
    _models_sign,
    _publish,
    _telemetry_show,
    _tokens_create,
    _tokens_ls,
    _tokens_revoke,
    client_args,
)
from server.cli.rollouts import add_rollout_parser

__all__ = ["EXIT_TAMPERED", "add_parser", "uvicorn_config"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the server's verbs on the ``edgefleet`` command."""
    add_drift_parser(sub)
    add_alerts_parser(sub)
    add_retrain_parser(sub)
    add_rollout_parser(sub)
    srv = sub.add_parser("server", help="run or bootstrap the edgefleet server")
    ssub = srv.add_subparsers(dest="server_command", metavar="VERB", required=True)
    run = ssub.add_parser("run", help="serve the REST API (uvicorn)")
    run.add_argument("--config", type=Path, default=None, help="TOML settings file")
    run.add_argument("--host", default=None, help="listen address (default: settings)")
    run.add_argument("--port", type=int, default=None, help="listen port (default: settings)")
    run.add_argument(
        "--forwarded-allow-ips",
        default=None,
        metavar="ADDRESSES",
        help=(
            "comma-separated proxy addresses or networks whose X-Forwarded-For/-Proto are "
            "trusted (default: forwarded_allow_ips; none: forwarded headers are ignored)"
        ),
    )
    run.set_defaults(func=_server_run)
    mq = ssub.add_parser(
        "mqtt", help="run only the MQTT service (ingest, chunks, desired state) as a worker"
    )
    mq.add_argument("--config", type=Path, default=None, help="TOML settings file")
    mq.add_argument(
        "--metrics-port", type=int, default=None, help="serve Prometheus /metrics on this port"
    )
    mq.set_defaults(func=_server_mqtt)
    init = ssub.add_parser("init", help="create or upgrade the schema and print a new admin token")
    init.add_argument("--config", type=Path, default=None)
    init.add_argument("--name", default="admin", help="name of the new admin token")
    init.add_argument("--json", action="store_true")
    init.set_defaults(func=_server_init)
    mig = ssub.add_parser("migrate", help="create or upgrade the database schema")
    mig.add_argument("--config", type=Path, default=None)
    mig.add_argument("--json", action="store_true")
    mig.set_defaults(func=_server_migrate)
    bc = ssub.add_parser(
        "broker-config",
        help="print the mosquitto.conf for the broker files this server manages",
        description=(
            "The Mosquitto configuration that goes with the server's password and ACL files: "
            "device listeners (device logins; the session is named after the login) and the "
            "replicas' own listener (server logins only). See docs/server.md."
        ),
    )
    bc.add_argument("--config", type=Path, default=None, help="TOML settings file")
    bc.add_argument(
        "--device-listener",
        action="append",
        default=None,
        metavar="HOST:PORT",
        help="a device listener (repeatable; default: the host and port of device_mqtt_url)",
    )
    bc.add_argument(
        "--server-listener",
        default=None,
        metavar="HOST:PORT",
        help="the replicas' listener (default: the host and port of mqtt_url)",
    )
    bc.add_argument("--cafile", type=Path, default=None, help="TLS CA for the device listeners")
    bc.add_argument("--certfile", type=Path, default=None, help="TLS certificate (device side)")
    bc.add_argument("--keyfile", type=Path, default=None, help="TLS private key (device side)")
    bc.add_argument(
        "--persistence-dir", type=Path, required=True, help="Mosquitto's persistence_location"
    )
    bc.add_argument("--log-file", type=Path, default=None, help="log_dest file (default stderr)")
    bc.add_argument("--user", default=None, help="Mosquitto's 'user' option (run as this user)")
    bc.add_argument("--out", type=Path, default=None, help="write the file here (atomically)")
    bc.add_argument("--json", action="store_true", help="print one JSON object")
    bc.set_defaults(func=_server_broker_config)

    tok = sub.add_parser("tokens", help="API tokens (admin)")
    tsub = tok.add_subparsers(dest="tokens_command", metavar="VERB", required=True)
    tc = tsub.add_parser("create", help="create a token (printed once)")
    tc.add_argument("--name", required=True)
    tc.add_argument("--role", required=True, choices=["admin", "publisher", "operator", "viewer"])
    client_args(tc)
    tc.set_defaults(func=_tokens_create)
    tl = tsub.add_parser("ls", help="list tokens")
    client_args(tl)
    tl.set_defaults(func=_tokens_ls)
    tr = tsub.add_parser("revoke", help="revoke a token by id")
    tr.add_argument("token_id")
    client_args(tr)
    tr.set_defaults(func=_tokens_revoke)

    pub = sub.add_parser("publish", help="upload a model and build (compress, sign) its bundle")
    pub.add_argument("model", type=Path, help="*.onnx or *.pt2")
    pub.add_argument("--name", required=True, help="model name (lowercase, digits, ._-)")
    pub.add_argument("--version", type=positive_int, default=None, help="default: next")
    pub.add_argument("--calib", type=Path, default=None, help="CALIB .npz")
    pub.add_argument("--eval", dest="eval_data", type=Path, default=None, help="EVAL .npz")
    pub.add_argument(
        "--no-compress",
        action="store_true",
        help="bundle the ONNX model as is (default when no --calib is given); "
        "health_check.json and drift_reference.json beside the model (as 'edgefleet "
        "compress' writes them) go into the bundle",
    )
    pub.add_argument(
        "--health-check",
        type=Path,
        default=None,
        help="health_check.json to use instead of the one beside the model (no compression)",
    )
    pub.add_argument(
        "--drift-reference",
        type=Path,
        default=None,
        help="drift_reference.json to use instead of the one beside the model (no compression)",
    )
    pub.add_argument(
        "--no-metadata",
        action="store_true",
        help="attach no health_check.json / drift_reference.json found beside the model",
    )
    pub.add_argument("--max-drop", type=float, default=None, help="allowed metric drop (0.01)")
    pub.add_argument("--signing", choices=["online", "offline"], default="online")
    pub.add_argument("--device-class", action="append", default=[], help="repeatable")
    pub.add_argument("--arch", action="append", default=[], help="repeatable")
    pub.add_argument("--min-agent-version", default=None)
    pub.add_argument("--expires-days", type=positive_int, default=None)
    pub.add_argument("--description", default=None)
    pub.add_argument("--model-card", type=Path, default=None, help="JSON object file")
    pub.add_argument("--wait", action="store_true", help="wait for the build job to finish")
    pub.add_argument("--timeout", type=float, default=3600.0, help="seconds to --wait (3600)")
    client_args(pub)
    pub.set_defaults(func=_publish)

    mod = sub.add_parser("models", help="the model registry")
    msub = mod.add_subparsers(dest="models_command", metavar="VERB", required=True)
    ml = msub.add_parser("ls", help="list models, or the versions of one model")
    ml.add_argument("name", nargs="?", default=None)
    client_args(ml)
    ml.set_defaults(func=_models_ls)
    ms = msub.add_parser("show", help="one version: report, model card, lineage, bundle")
    ms.add_argument("name")
    ms.add_argument("version", type=positive_int)
    client_args(ms)
    ms.set_defaults(func=_models_show)
    mg = msub.add_parser("sign", help="sign a version's manifest with a local release key")
    mg.add_argument("name")
    mg.add_argument("version", type=positive_int)
    mg.add_argument("--key", type=Path, required=True, help="release private key (PEM)")
    client_args(mg)
    mg.set_defaults(func=_models_sign)
    mr = msub.add_parser("release", help="publish a version once enough signatures are in")
    mr.add_argument("name")
    mr.add_argument("version", type=positive_int)
    client_args(mr)
    mr.set_defaults(func=_models_release)

    jobs = sub.add_parser("jobs", help="build jobs")
    jsub = jobs.add_subparsers(dest="jobs_command", metavar="VERB", required=True)
    js = jsub.add_parser("show", help="one job's status and progress")
    js.add_argument("job_id")
    client_args(js)
    js.set_defaults(func=_jobs_show)

    dev = sub.add_parser("devices", help="the fleet")
    dsub = dev.add_subparsers(dest="devices_command", metavar="VERB", required=True)
    de = dsub.add_parser("enroll", help="enroll a device; prints its broker credentials once")
    de.add_argument("--id", dest="device_id", default=None, help="default: generated")
    de.add_argument("--class", dest="device_class", required=True)
    de.add_argument("--group", action="append", default=[], help="repeatable")
    de.add_argument("--tag", action="append", default=[], help="repeatable")
    de.add_argument("--out", type=Path, default=None, help="also write the enrollment as JSON")
    client_args(de)
    de.set_defaults(func=_devices_enroll)
    dl = dsub.add_parser("ls", help="list devices")
    dl.add_argument("--group", default=None)
    dl.add_argument("--tag", default=None)
    dl.add_argument("--class", dest="device_class", default=None)
    dl.add_argument("--online", action="store_true", help="only online devices")
    dl.add_argument("--limit", type=positive_int, default=100)
    client_args(dl)
    dl.set_defaults(func=_devices_ls)
    ds = dsub.add_parser("show", help="one device")
    ds.add_argument("device_id")
    client_args(ds)
    ds.set_defaults(func=_devices_show)
    dd = dsub.add_parser("desired", help="a device's desired state (own, groups, effective)")
    dd.add_argument("device_id")
    client_args(dd)
    dd.set_defaults(func=_devices_desired)
    dr = dsub.add_parser("rm", help="decommission a device (revokes its broker login)")
    dr.add_argument("device_id")
    client_args(dr)
    dr.set_defaults(func=_devices_rm)

    dep = sub.add_parser(
        "deploy", help="assign a published model version to a device or group (signed, retained)"
    )
    dep.add_argument("model", help="model name")
    dep.add_argument("version", type=positive_int, help="a published version")
    where = dep.add_mutually_exclusive_group(required=True)
    where.add_argument("--device", default=None, help="target device id")
    where.add_argument("--group", default=None, help="target group")
    dep.add_argument("--shadow", default=None, metavar="MODEL:VERSION", help="shadow candidate")
    dep.add_argument("--rollout-id", default=None, help="label carried in the signed state")
    dep.add_argument("--expires-days", type=positive_int, default=None)
    client_args(dep)
    dep.set_defaults(func=_deploy)
    deps = sub.add_parser("deployments", help="desired states issued")
    depsub = deps.add_subparsers(dest="deployments_command", metavar="VERB", required=True)
    dls = depsub.add_parser("ls", help="newest first")
    dls.add_argument("--device", default=None)
    dls.add_argument("--group", default=None)
    dls.add_argument("--limit", type=positive_int, default=50)
    client_args(dls)
    dls.set_defaults(func=_deployments_ls)

    tel = sub.add_parser("telemetry", help="stored telemetry")
    tsub2 = tel.add_subparsers(dest="telemetry_command", metavar="VERB", required=True)
    tsh = tsub2.add_parser("show", help="records by device, model version and time window")
    tsh.add_argument("--device", default=None)
    tsh.add_argument("--model", default=None)
    tsh.add_argument("--model-version", type=positive_int, default=None)
    tsh.add_argument("--since", default=None, help="ISO time, e.g. 2025-01-01T00:00:00Z")
    tsh.add_argument("--until", default=None)
    tsh.add_argument("--limit", type=positive_int, default=50)
    client_args(tsh)
    tsh.set_defaults(func=_telemetry_show)

    aud = sub.add_parser("audit", help="the hash-chained audit log (admin)")
    asub = aud.add_subparsers(dest="audit_command", metavar="VERB", required=True)
    av = asub.add_parser("verify", help="detect edited, deleted or reordered entries")
    client_args(av)
    av.set_defaults(func=_audit_verify)
    al = asub.add_parser("ls", help="list entries")
    al.add_argument("--after", type=int, default=0)
    al.add_argument("--limit", type=positive_int, default=100)
    client_args(al)
    al.set_defaults(func=_audit_ls)
    af = asub.add_parser(
        "feedback", help="label coverage and accuracy by predicted class (the feedback loop)"
    )
    af.add_argument("--model", required=True)
    af.add_argument("--version", type=int, default=None)
    client_args(af)
    af.set_defaults(func=_audit_feedback)
