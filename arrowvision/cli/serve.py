"""``arrowvision serve``: the HTTP service (FastAPI + uvicorn in this process, or Ray Serve)."""

from __future__ import annotations

import argparse
from typing import Any

from ..service.security import add_access_arguments, security_from_args
from ._common import (EXIT_OK, add_backend_options, command, non_negative_float, port_number, positive_float,
                      positive_int, progress_enabled, ray_group, weights_path)
from ._load import backend_options, check_backend_options, load_encoder, load_text_model_if_any, resolve_backend
from .bundle import add_bundle_option, check_bundle_options, load_from_bundle


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = command(sub, "serve", "HTTP embedding service with dynamic micro-batching (FastAPI + uvicorn)", cmd_serve)
    add_backend_options(p)
    add_bundle_option(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=port_number, default=8000, help="port to listen on")
    p.add_argument("--max-batch", type=positive_int, default=32, help="images per model call")
    p.add_argument("--max-wait-ms", type=non_negative_float, default=5.0, help="how long a batch waits to fill")
    p.add_argument("--max-queue", type=positive_int, default=256, help="queued images before 503")
    p.add_argument("--max-body-mb", type=positive_float, default=20.0, help="largest request body, MiB")
    p.add_argument("--timeout", type=positive_float, default=30.0, help="per-request timeout, seconds")
    p.add_argument("--quiet", action="store_true", help="no access log")
    p.add_argument("--index", metavar="OUT_DIR", help="an embeddings dataset (indexed or not) to search: adds POST /v1/search, "
                   "GET /v1/thumbnail and the search page at /")
    _add_serve_profiles_and_access(p)
    _ray_serve_options(p)


def _add_serve_profiles_and_access(p: argparse.ArgumentParser) -> None:
    """serve: model profiles, image URLs, access control, logs (issue 19)."""
    p.add_argument("--model", action="append", metavar="NAME=WEIGHTS", dest="profiles",
                   help="serve WEIGHTS as model NAME (repeat for several; requests pick one with \"model\": NAME)")
    p.add_argument("--default", dest="default_model", metavar="NAME", help="model used when a request names none "
                   "(default: the first --model)")
    p.add_argument("--max-loaded-models", type=positive_int, metavar="N",
                   help="models kept loaded at once; the least recently used is unloaded (default: all)")
    p.add_argument("--allow-private-urls", action="store_true",
                   help="let image URLs reach loopback, private and link-local hosts (intranet use)")
    p.add_argument("--url-timeout", type=positive_float, default=20.0, help="longest image-URL fetch, seconds")
    add_access_arguments(p)  # the one access policy of every command that listens (docs/SECURITY.md)
    p.add_argument("--log-format", choices=["text", "json"], default="text",
                   help="log lines (each with the request id) as text or JSON documents")


def _ray_serve_options(p: argparse.ArgumentParser) -> None:
    ray = ray_group(p, "local: uvicorn in this process; ray: Ray Serve, the model in --replicas replicas")
    ray.add_argument("--replicas", type=positive_int, help="model replicas (default 1; the initial count when autoscaling)")
    ray.add_argument("--min-replicas", type=int, help="autoscaling: fewest model replicas (0 allowed)")
    ray.add_argument("--max-replicas", type=positive_int, help="autoscaling: most model replicas")
    ray.add_argument("--cpus-per-replica", type=positive_float,
                     help="CPUs Ray gives each model replica (default 1); its inference threads match them")


def cmd_serve(args: argparse.Namespace) -> int:
    from ..service.app import listen, serve
    from ..service.config import ServiceConfig
    from ..service.profiles import registry_from_profiles

    if args.bundle:
        check_bundle_options(args)  # before anything else: the bundle fixes weights, backend, engine
    if args.profiles and (args.weights or getattr(args, "weights_positional", None)):
        args.command_parser.error("give either --weights or --model NAME=WEIGHTS profiles, not both")
    if not args.profiles and (args.default_model or args.max_loaded_models):
        args.command_parser.error("--default and --max-loaded-models apply to --model profiles")
    security = security_from_args(args)
    config = ServiceConfig(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                           max_body_bytes=int(args.max_body_mb * 1024 * 1024), request_timeout_s=args.timeout,
                           allow_private_urls=args.allow_private_urls, url_timeout_s=args.url_timeout)
    if args.engine == "ray" and args.index:
        args.command_parser.error("--index (search and the page) runs with --engine local only")
    if args.profiles and args.index:
        args.command_parser.error("--index searches with one model: give --weights, not --model profiles")
    if args.engine == "ray":
        local_only = {"--model": args.profiles, "--log-format json": args.log_format == "json",
                      "--max-num-patches": args.max_num_patches is not None}  # replicas use the default (256)
        for option, value in local_only.items():
            if value:
                args.command_parser.error(f"{option} applies to --engine local only (Ray Serve runs its own proxy)")
        return serve_on_ray(args, config, security)
    for option in ("address", "replicas", "min_replicas", "max_replicas", "cpus_per_replica"):
        if getattr(args, option) is not None:
            args.command_parser.error(f"--{option.replace('_', '-')} applies to --engine ray only")
    sock = listen(args.host, args.port)  # a busy port fails now, before the model loads

    def load(weights: str):
        text_model = load_text_model_if_any(args, weights)  # weights converted with --tower all also serve text
        return (text_model.vision if text_model else load_encoder(args, weights)), text_model

    if args.bundle:
        encoder, text_model = load_from_bundle(args)
        serve(encoder, config=config, sock=sock, access_log=not args.quiet, model_name=args.bundle, text_model=text_model,
              index=_index(args, encoder), security=security, log_format=args.log_format)
        return EXIT_OK
    if args.profiles:
        models = registry_from_profiles(args.profiles, load, default=args.default_model, max_loaded=args.max_loaded_models,
                                        backend=resolve_backend(args.backend))
        serve(models, config=config, sock=sock, access_log=not args.quiet, security=security, log_format=args.log_format)
        return EXIT_OK
    weights = weights_path(args, demo_default=True)
    encoder, text_model = load(weights)
    serve(encoder, config=config, sock=sock, access_log=not args.quiet, model_name=weights, text_model=text_model,
          index=_index(args, encoder), security=security, log_format=args.log_format)
    return EXIT_OK


def _index(args: argparse.Namespace, encoder: Any) -> Any:
    if not args.index:
        return None
    from .index import open_index_for_serving

    return open_index_for_serving(args.index, encoder.checksum, progress_enabled(args))


def serve_on_ray(args: argparse.Namespace, config: Any, security: Any = None) -> int:
    """``arrowvision serve --engine ray``: the CLI's backend options, checked as for the local
    service; ``security``: the same access policy (a ``SecurityConfig``)."""
    from ..distributed.serve import Replicas, run_service
    from ..service.app import listen

    listen(args.host, args.port).close()  # a busy port fails now, before anything deploys
    weights = weights_path(args, demo_default=True)
    backend = resolve_backend(args.backend)
    check_backend_options(args, backend)
    device = "cpu" if backend == "torch" and str(args.device).upper() == "CPU" else str(args.device)
    replicas = Replicas(count=args.replicas or 1, minimum=args.min_replicas, maximum=args.max_replicas,
                        cpus=args.cpus_per_replica or 1.0)
    replicas.options(config.max_batch, config.max_queue)  # bad bounds fail before anything starts
    run_service(weights, host=args.host, port=args.port, address=args.address, backend=backend, device=device,
                backend_options=backend_options(args, backend), config=config, replicas=replicas, security=security)
    return 0


register = _add_serve
