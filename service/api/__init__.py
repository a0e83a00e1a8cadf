"""The gateway's endpoints, one blueprint per endpoint."""
from .. import openapi
from . import chat, completions, embeddings, health, models

BLUEPRINTS = (health.bp, models.bp, chat.bp, completions.bp, embeddings.bp, openapi.bp)


def register_blueprints(app):
    """Register every endpoint's blueprint on app."""
    for blueprint in BLUEPRINTS:
        app.register_blueprint(blueprint)
