"""`loramux-server` / `python -m server`: parse flags into Settings, configure logging, run uvicorn."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Literal, TypeVar, get_args, get_origin

import uvicorn
from pydantic import ValidationError

from server.app import create_app
from server.settings import Settings

S = TypeVar("S", bound=Settings)


def build_parser(settings_cls: type[Settings] = Settings, prog: str = "loramux-server",
                 description: str = "Multi-tenant LoRA adapter inference server (OpenAI-compatible HTTP API).",
                 ) -> argparse.ArgumentParser:
    """One flag per settings field; flags left out fall back to LORAMUX_* variables, then defaults."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description,
        epilog="Every flag can also be set with an environment variable: --max-loras -> LORAMUX_MAX_LORAS.",
        argument_default=argparse.SUPPRESS,
    )
    for name, field in settings_cls.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = field.default_factory() if field.default_factory else field.default
        help_text = f"{field.description or ''} (default: {default})".strip()
        if name == "preload":
            parser.add_argument(flag, nargs="+", action="extend", metavar="ID", help=help_text)
        elif field.annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        elif get_origin(field.annotation) is Literal:
            parser.add_argument(flag, choices=get_args(field.annotation), type=str.lower, help=help_text)
        else:
            parser.add_argument(flag, metavar=name.upper(), help=help_text)
    return parser


def parse_settings(argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None,
                   settings_cls: type[S] = Settings) -> S:
    """Settings from the command line (explicit flags win over LORAMUX_* variables)."""
    parser = parser or build_parser(settings_cls)
    args = vars(parser.parse_args(argv))
    try:
        return settings_cls(**args)
    except ValidationError as e:
        problems = "; ".join(
            f"--{'.'.join(str(p) for p in err['loc']).replace('_', '-')}: {err['msg']}" if err["loc"]
            else err["msg"].removeprefix("Value error, ") for err in e.errors()
        )
        parser.error(problems)


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )


def main(argv: Sequence[str] | None = None) -> None:
    settings = parse_settings(argv)
    configure_logging(settings.log_level)
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,  # keep the logging configured above
        access_log=False,  # server.api.logging writes one structured line per request
        timeout_graceful_shutdown=max(1, int(settings.drain_timeout)),
        limit_concurrency=settings.max_connections,
    )
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
