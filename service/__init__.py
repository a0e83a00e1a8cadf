"""An OpenAI-compatible gateway for llama.cpp's llama-server."""
__version__ = "0.3.0"

from flask import Flask

from .api import register_blueprints
from .config import SETTINGS_BY_NAME, ConfigError, load_settings, route_timeouts
from .errors import register_error_handlers
from .operations.health import init_health
from .operations.lifecycle import Lifecycle
from .operations.metrics import init_metrics
from .operations.openapi import init_openapi
from .policy.hooks import init_policy
from .proxy.disconnect import DisconnectWatch
from .models.environment import upstream_models
from .proxy.routing import Router, route_options, upstream_targets
from .proxy.scheduler import init_scheduler
from .proxy.upstream import Upstream
from .store import init_store
from .warm.wiring import init_warm


def create_app(config=None, pool=None, models=None, local_urls=None) -> Flask:
    """Build the gateway app: settings from config (a mapping of setting names) or else the environment; pool,
    the local models bin/serve runs (service/llama/pool.py), if any; models, the ModelSet to route (else the
    one LLAMA_SERVER_URL or MODEL_UPSTREAMS make), with local_urls, model id -> the llama.cpp run for it."""
    app = Flask(__name__)
    settings = load_settings(config)
    app.config.from_mapping(settings)
    if config:
        # Flask's own keys (TESTING, ...) pass through.
        app.config.update((key, value) for key, value in config.items() if key not in SETTINGS_BY_NAME)
    app.config["MAX_CONTENT_LENGTH"] = settings["MAX_BODY_BYTES"]
    app.json.sort_keys = False
    if models is None and not (settings["LLAMA_SERVER_URL"] or settings["MODEL_UPSTREAMS"]):
        raise ConfigError("LLAMA_SERVER_URL: create_app needs the upstream's URL, or MODEL_UPSTREAMS, or the "
                          "models bin/serve runs")
    if models is None:
        models = upstream_models(settings)
    app.extensions["router"] = router = Router.from_models(
        models, local_urls, **route_options(settings, probe=lambda url: upstream.healthy(url)))
    app.extensions["upstream"] = upstream = Upstream(
        upstream_targets(router, settings["UPSTREAM_RETRIES"]),
        timeouts=route_timeouts(settings),
        pool_size=settings["WAITRESS_THREADS"],
        backoff=settings["UPSTREAM_BACKOFF_S"],
        backoff_max=settings["UPSTREAM_BACKOFF_MAX_S"],
        api_key=settings["LLAMA_API_KEY"],
    )
    router.on_target = upstream.add_target  # replicas that routes gain while the gateway runs (Router.apply)
    app.extensions["model_pool"] = pool
    app.extensions["request_sinks"] = []  # each called with every request's log entry (RequestRecord.sinks)
    init_scheduler(app, settings)
    init_warm(app, settings)  # after the scheduler: it numbers the slots of the models it keeps warm
    app.extensions["disconnect_watch"] = watch = DisconnectWatch()
    app.extensions["lifecycle"] = Lifecycle(watch)
    register_error_handlers(app)
    init_store(app, settings)  # before the policy, which asks it for the keys made at run time
    init_metrics(app, include_upstream=settings["METRICS_INCLUDE_UPSTREAM"])
    init_policy(app, settings)
    init_health(app, settings["HEALTH_CACHE_S"])
    init_openapi(app, __version__)
    register_blueprints(app)
    return app
