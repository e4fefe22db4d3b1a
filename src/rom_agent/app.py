"""The ASGI application: builds the services, mounts the routes, maps every error to the SPEC
body format."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from dotenv import dotenv_values
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from rom_agent import __version__
from rom_agent.agent.chat import ChatService
from rom_agent.agent.loop import AgentLoop
from rom_agent.agent.tools import ToolRegistry, default_registry
from rom_agent.config import ConfigError, Settings
from rom_agent.flags import FlagStore, load_persisted_overrides
from rom_agent.fleet.coordinator import Fleet
from rom_agent.http import admin, chat, health, openai_compat, web
from rom_agent.http.errors import ApiError, error_body, error_response, to_api_error
from rom_agent.http.fastlane import FastLane, FastRoute
from rom_agent.http.middleware import RequestContextMiddleware
from rom_agent.instrumentation import runtime
from rom_agent.logs import get_logger
from rom_agent.metrics import Metrics
from rom_agent.providers.base import ModelRef, Provider
from rom_agent.providers.bedrock import BedrockProvider
from rom_agent.providers.openai import OpenAIProvider
from rom_agent.providers.simulator import SimBehaviour, SimulatorProvider
from rom_agent.resilience.bottleneck import AdmissionRejected, Bottleneck
from rom_agent.resilience.breaker import BreakerRegistry
from rom_agent.resilience.clock import Clock, SystemClock
from rom_agent.resilience.errors import PipelineError
from rom_agent.resilience.pipeline import Pipeline
from rom_agent.services import Services, parse_api_keys
from rom_agent.store.backend import StoreBackend

log = get_logger("rom_agent.app")


def build_providers(settings: Settings, chain: Sequence[ModelRef]) -> dict[str, Provider]:
    """One provider object per provider named in the chain (each owns a connection pool)."""
    providers: dict[str, Provider] = {}
    for name in dict.fromkeys(ref.provider for ref in chain):
        if name == "simulator":
            latency = settings.simulator_latency_ms / 1000
            chunk_delay = settings.simulator_chunk_delay_ms / 1000
            providers[name] = SimulatorProvider(
                default=SimBehaviour(latency_s=latency, chunk_delay_s=chunk_delay)
            )
        elif name == "bedrock":
            providers[name] = BedrockProvider.from_settings(settings)
        elif name == "openai":
            providers[name] = OpenAIProvider.from_settings(settings)
        else:
            raise ConfigError(
                f"MODEL_CHAIN: unknown provider {name!r} (known: simulator, bedrock, openai)"
            )
    return providers


def env_keys() -> frozenset[str]:
    """Which settings came from the environment or `.env` (for `sources` in /admin/flags)."""
    dotenv = {key.upper() for key in dotenv_values(Settings.model_config.get("env_file"))}
    return frozenset(
        name
        for name in Settings.model_fields
        if name.upper() in os.environ or name.upper() in dotenv
    )


def create_services(
    settings: Settings,
    *,
    clock: Clock | None = None,
    providers: dict[str, Provider] | None = None,
    tools: ToolRegistry | None = None,
) -> Services:
    """Build every long-lived object. Nothing here touches the network or the event loop."""
    clock = clock or SystemClock()
    flags = FlagStore(settings, env_keys=env_keys())
    chain = tuple(ModelRef.parse(entry) for entry in settings.model_chain)
    metrics = Metrics(lambda: flags.current.enable_metrics, [ref.id for ref in chain])
    if providers is None:
        providers = build_providers(settings, chain)
    breakers = BreakerRegistry(flags, clock, metrics)
    bottleneck = Bottleneck(flags, clock, metrics)
    metrics.breaker_source = breakers
    metrics.admission_source = bottleneck
    fleet = Fleet(settings, flags, bottleneck, metrics, clock)
    pipeline = Pipeline(flags, providers, breakers, metrics, clock)
    tools = tools if tools is not None else default_registry(settings.kb_dir)
    agent = AgentLoop(tools, flags, metrics, clock)
    store = StoreBackend(settings.database_url)
    conversations = store.conversations
    services = Services(
        settings=settings,
        flags=flags,
        metrics=metrics,
        clock=clock,
        store=store,
        conversations=conversations,
        providers=providers,
        breakers=breakers,
        bottleneck=bottleneck,
        pipeline=pipeline,
        tools=tools,
        chat=ChatService(
            flags=flags, conversations=conversations, pipeline=pipeline, agent=agent, clock=clock
        ),
        fleet=fleet,
        api_key_digests=parse_api_keys(settings.api_keys),
    )
    runtime.install(metrics.registry, lambda: flags.current, services.event_loop_lag)
    return services


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    @app.exception_handler(AdmissionRejected)
    @app.exception_handler(PipelineError)
    async def known_error(_: Request, exc: Exception) -> Response:
        return error_response(to_api_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED"}.get(exc.status_code, "HTTP_ERROR")
        message = "route not found" if exc.status_code == 404 else str(exc.detail)
        return Response(
            error_body(exc.status_code, code, message),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
            media_type="application/json",
        )

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> Response:
        return error_response(ApiError(400, "INVALID_REQUEST", "invalid request"))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> Response:
        log.exception("unhandled error", error=type(exc).__name__)
        return error_response(ApiError(500, "INTERNAL", "internal error"))


class ServiceApp(FastAPI):
    """FastAPI, entered through the request context and the chat routes' fast lane.

    Requests go: request context (id, access log, metrics) → CORS → fast lane for the chat
    routes → FastAPI for everything else (admin, health, the lifespan).
    """

    _entry: ASGIApp | None = None

    def set_entry(self, entry: ASGIApp) -> None:
        self._entry = entry

    async def framework(self, scope: Scope, receive: Receive, send: Send) -> None:
        await super().__call__(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["app"] = self  # as Starlette does: `request.app.state` works in the fast lane
        await (self._entry or self.framework)(scope, receive, send)


def create_app(settings: Settings, *, services: Services | None = None) -> ServiceApp:
    services = services or create_services(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await services.store.start()
        await load_persisted_overrides(services.flags, services.store.flag_overrides)
        await services.fleet.start(services.store)
        _startup_warnings(settings)
        services.event_loop_lag.start()
        log.info(
            "started",
            version=__version__,
            models=[ref.qualified for ref in services.chain],
            database=services.store.display,
        )
        try:
            yield
        finally:
            services.bottleneck.start_draining()
            await services.event_loop_lag.stop()
            for provider in services.providers.values():
                await provider.aclose()
            await services.fleet.close()
            await services.store.close()
            log.info("stopped")

    app = ServiceApp(
        title="ROM Agent",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    app.state.services = services
    app.include_router(health.router)
    app.include_router(chat.router)
    app.include_router(openai_compat.router)
    app.include_router(admin.router)
    for method, path, endpoint in web.ROUTES:
        app.add_api_route(path, endpoint, methods=[method], include_in_schema=False)
    _install_error_handlers(app)

    asgi: ASGIApp = FastLane(
        app.framework,
        [
            ("POST", FastRoute("/api/chat", chat.chat)),
            ("POST", FastRoute("/api/chat/stream", chat.chat_stream)),
            ("POST", FastRoute("/v1/chat/completions", openai_compat.chat_completions, True)),
            ("GET", FastRoute("/v1/models", openai_compat.list_models, True)),
        ],
    )
    if settings.cors_origins:
        asgi = CORSMiddleware(
            asgi,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST", "PATCH", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "X-Request-Id"],
        )
    app.set_entry(RequestContextMiddleware(asgi, metrics=services.metrics))
    return app


def _startup_warnings(settings: Settings) -> None:
    admin.warn_about_admin_token(settings)
    loopback = settings.host in ("127.0.0.1", "localhost", "::1")
    if not settings.api_keys and not loopback:
        log.warning("chat routes are open: API_KEYS is unset and HOST is not loopback")
    if settings.enable_fault_injection:
        log.warning(
            "FAULT INJECTION IS ENABLED: FORCE_ERROR messages and X-Fault headers will make "
            "requests fail on purpose. Never enable this in production."
        )
