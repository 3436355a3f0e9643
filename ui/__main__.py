"""`make ui`: the page in front of a running Triton server, or of one it starts.

    python -m ui [--host 127.0.0.1] [--port 7860] [--grpc-url 127.0.0.1:8001] [--http-url 127.0.0.1:8000]
                 [--protocol grpc] [--timeout 300] [--samples assets] [--start-server build/model_repository]
    python -m ui --probe ...     exit 0 if a server answers at the --protocol URL, 3 if none does

With --start-server REPOSITORY it starts tritonserver on that repository (on the ports of the two
URLs) unless one already answers, and stops it (after its requests in flight) when the page stops.
"""
from __future__ import annotations

import argparse
import ipaddress
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from aiohttp import web

from clients.client import SegmentationClient
from clients.errors import ClientError, ServerUnreachable
from clients.transport import PROTOCOLS, normalise_url

from .app import create_app
from .backend import Backend

DEFAULT_PORT = 7860
DEFAULT_TIMEOUT_S = 300.0
PROBE_TIMEOUT_S = 5.0
REPO_ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ui", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="address the page listens on (default loopback only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--grpc-url", default="127.0.0.1:8001", help="the Triton server's gRPC host:port")
    parser.add_argument("--http-url", default="127.0.0.1:8000", help="the Triton server's HTTP host:port")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="grpc", help="the protocol selected at first")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per Triton request")
    parser.add_argument("--samples", type=Path, default=REPO_ROOT / "assets", help="directory of sample images")
    parser.add_argument("--start-server", type=Path, metavar="REPOSITORY",
                        help="start tritonserver on this model repository when none answers")
    parser.add_argument("--metrics-port", type=int, default=8002, help="metrics port of a started tritonserver")
    parser.add_argument("--probe", action="store_true", help="only say whether a server answers (exit 0 / 3)")
    return parser.parse_args(argv)


def server_answers(url: str, protocol: str) -> bool:
    """Whether a Triton server serving the `evf_sam` contract answers at `url` (raises if one answers
    but serves something else)."""
    try:
        SegmentationClient(url, protocol, timeout=PROBE_TIMEOUT_S).close()
    except ServerUnreachable:
        return False
    return True


def start_server(args: argparse.Namespace):
    from serving.server import TritonServer

    grpc_host, grpc_port = host_port(args.grpc_url)
    http_host, http_port = host_port(args.http_url)
    if grpc_host != http_host:
        raise SystemExit(f"error: to start a server, the gRPC and HTTP URLs need one host, got {grpc_host} and {http_host}")
    log_file = Path(args.start_server).resolve().parent / "tritonserver-ui.log"
    print(f"no Triton server answers at {args.grpc_url}: starting one on {args.start_server} (log: {log_file}) ...",
          flush=True)
    return TritonServer(args.start_server, http_port, grpc_port, args.metrics_port, grpc_host,
                        log_file=log_file).run()


def host_port(url: str):
    host, _, port = normalise_url(url).rpartition(":")
    if not host or not port.isdigit():
        raise SystemExit(f"error: expected host:port, got {url!r}")
    return host, int(port)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    urls = {"grpc": args.grpc_url, "http": args.http_url}
    server = None
    if args.probe or args.start_server is not None:
        try:
            answers = server_answers(urls[args.protocol], args.protocol)
        except ClientError as exc:  # something answers, but not as the contract says
            print(f"error: {exc}", file=sys.stderr)
            return exc.exit_code
        if args.probe:
            return 0 if answers else ServerUnreachable.exit_code
        server = None if answers else start_server(args)
    try:
        if not is_loopback(args.host):
            print(f"warning: the page listens on {args.host}: anyone who reaches it can use the Triton server",
                  file=sys.stderr)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        app = create_app(Backend(urls, args.timeout), args.samples, args.protocol)
        print(f"EVF-SAM page: http://{args.host}:{args.port}/  (Triton gRPC {args.grpc_url}, HTTP {args.http_url}); "
              "stop with Ctrl-C", flush=True)
        web.run_app(app, host=args.host, port=args.port, print=None, access_log=None)
    finally:
        if server is not None:
            print("stopping tritonserver ...", flush=True)
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
