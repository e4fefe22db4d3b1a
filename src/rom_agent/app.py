"""The ASGI application: builds the services and serves the one route table."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import cast

from dotenv import dotenv_values
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.types import ASGIApp

from rom_agent.agent.chat import ChatService
from rom_agent.agent.loop import AgentLoop
from rom_agent.agent.tools import ToolRegistry, default_registry
from rom_agent.config import ConfigError, Settings
from rom_agent.domain.events import Events
from rom_agent.domain.messages import ModelRef
from rom_agent.flags import FlagStore, load_persisted_overrides
from rom_agent.fleet.coordinator import Fleet
from rom_agent.http import admin
from rom_agent.http.errors import ErrorMapperMiddleware
from rom_agent.http.middleware import JsonCORSMiddleware, RequestContextMiddleware
from rom_agent.http.routes import ROUTES, TableRouter
from rom_agent.instrumentation import runtime
from rom_agent.instrumentation.prometheus import PrometheusMetrics
from rom_agent.instrumentation.propagation import tracing_requested
from rom_agent.logs import get_logger
from rom_agent.providers.base import Provider
from rom_agent.providers.bedrock import BedrockProvider
from rom_agent.providers.openai import OpenAIProvider
from rom_agent.providers.simulator import SimBehaviour, SimulatorProvider
from rom_agent.resilience.bottleneck import Bottleneck
from rom_agent.resilience.breaker import BreakerRegistry
from rom_agent.resilience.clock import Clock, SystemClock
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
    env_file = cast("str | None", Settings.model_config.get("env_file"))  # ".env" (config.py)
    dotenv = {key.upper() for key in dotenv_values(env_file)}
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
    metrics = PrometheusMetrics(lambda: flags.current.enable_metrics, [ref.id for ref in chain])
    events = Events()
    metrics.listen(events, flags)
    if providers is None:
        providers = build_providers(settings, chain)
    breakers = BreakerRegistry(flags, clock, events)
    bottleneck = Bottleneck(flags, clock, events)
    metrics.breaker_source = breakers
    metrics.admission_source = bottleneck
    fleet = Fleet(settings, flags, bottleneck, metrics, clock, breakers=breakers)
    pipeline = Pipeline(flags, providers, breakers, events, clock)
    tools = tools if tools is not None else default_registry(settings.kb_dir)
    agent = AgentLoop(tools, flags, events, clock)
    store = StoreBackend(settings.database_url)
    conversations = store.conversations
    services = Services(
        settings=settings,
        flags=flags,
        events=events,
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


class ServiceApp(Starlette):
    """Starlette, with the one error mapper as its outermost layer.

    Starlette's own stack puts `ServerErrorMiddleware` (plain-text 500s) and
    `ExceptionMiddleware` (its exception handlers) around the routes; here every route already
    maps its errors (`http/routes.py`) and `ErrorMapperMiddleware` maps whatever escapes the
    router or a middleware, in the same bodies. Middleware added with `add_middleware` sits
    inside it and wraps every route.
    """

    def build_middleware_stack(self) -> ASGIApp:
        app: ASGIApp = self.router
        for cls, args, kwargs in reversed(self.user_middleware):
            app = cls(app, *args, **kwargs)
        return ErrorMapperMiddleware(app)


def create_app(settings: Settings, *, services: Services | None = None) -> ServiceApp:
    """The service: one Starlette application serving the route table (`http/routes.py`).

    Requests go: request context (id, access log, metrics) → CORS (when configured) → router
    → the route's guard and endpoint; every error through `errors.error_response_for`.
    """
    services = services or create_services(settings)

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        await services.store.start()
        await load_persisted_overrides(services.flags, services.store.flag_overrides)
        await services.fleet.start(services.store)
        _startup_warnings(settings, services.flags.current)
        services.event_loop_lag.start()
        # `started` is logged by the server once the port is bound (server.py).
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

    middleware = [Middleware(RequestContextMiddleware, events=services.events)]
    if tracing_requested():
        # Imported only here: with tracing off, OpenTelemetry is never loaded.
        from rom_agent.instrumentation import tracing

        middleware.insert(0, Middleware(tracing.TracingMiddleware, tracing.install(services)))
    if settings.cors_origins:
        middleware.append(
            Middleware(
                JsonCORSMiddleware,
                allow_origins=list(settings.cors_origins),
                allow_methods=["GET", "POST", "PATCH", "DELETE"],
                allow_headers=["Authorization", "Content-Type", "X-Request-Id"],
            )
        )
    app = ServiceApp(middleware=middleware)
    app.router = TableRouter(ROUTES, lifespan=lifespan)
    app.state.services = services
    return app


def _startup_warnings(settings: Settings, effective: Settings) -> None:
    """`effective`: the flags as they apply, runtime overrides from the store included."""
    admin.warn_about_admin_token(settings)
    loopback = settings.host in ("127.0.0.1", "localhost", "::1")
    if not settings.api_keys and not loopback:
        log.warning("chat routes are open: API_KEYS is unset and HOST is not loopback")
    if effective.enable_fault_injection:
        log.warning(
            "FAULT INJECTION IS ENABLED: FORCE_ERROR messages and X-Fault headers will make "
            "requests fail on purpose. Never enable this in production."
        )
