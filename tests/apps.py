"""Gateways under test: the settings they start from, the keys tests use, and an app routed by model."""

# Short timeouts and fast backoff so that fault tests finish in milliseconds.
FAST_SETTINGS = {"UPSTREAM_BACKOFF_S": "0.01", "UPSTREAM_BACKOFF_MAX_S": "0.05"}

# A key of OPENAI_API_KEYS, which names its client TEAM_ID, with limits no test reaches by accident.
TEAM_KEY = "sk-responses-test"
TEAM_ID = "team_r"
TEAM_KEY_SETTINGS = {"OPENAI_API_KEYS": f"{TEAM_KEY}:{TEAM_ID}", "RATE_LIMIT_RPM": "1000",
                     "RATE_LIMIT_TPM": "1000000", "RATE_LIMIT_CONCURRENT": "4"}

# The one OPENAI_API_KEY (its client is "default"), with limits whose rate-limit headers tests read.
DEFAULT_KEY = "k"
DEFAULT_KEY_LIMITS = {"OPENAI_API_KEY": DEFAULT_KEY, "RATE_LIMIT_RPM": "50", "RATE_LIMIT_TPM": "100000"}


def routed_app(make_app, routes, **settings):
    """An app with MODEL_UPSTREAMS built from {name: [url, ...]}."""
    spec = ",".join(f"{name}={'|'.join(urls)}" for name, urls in routes.items())
    return make_app(None, MODEL_UPSTREAMS=spec, **settings)
