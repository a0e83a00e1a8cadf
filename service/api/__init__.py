"""The gateway's endpoints, one blueprint per endpoint, each with the API family its clients speak."""
from ..families import ANTHROPIC, LLAMA, OPENAI, RESPONSES
from ..operations import openapi
from ..ui import bp as ui_bp
from . import (admin, admin_keys, admin_usage, chat, completions, embeddings, health, infill, messages, models, reload,
               rerank, responses, root, tokens)

# Each blueprint and the family of its routes (None: no family; errors there are OpenAI-shaped).
BLUEPRINTS = (
    (root.bp, None),
    (health.bp, None),
    (openapi.bp, None),
    (models.bp, OPENAI),
    (chat.bp, OPENAI),
    (completions.bp, OPENAI),
    (embeddings.bp, OPENAI),
    (admin.bp, OPENAI),
    (admin_keys.bp, OPENAI),
    (admin_usage.bp, OPENAI),
    (reload.bp, OPENAI),
    (responses.bp, RESPONSES),
    (messages.bp, ANTHROPIC),
    (rerank.bp, LLAMA),
    (tokens.bp, LLAMA),
    (infill.bp, LLAMA),
    (ui_bp, OPENAI),  # the operators' page; its JSON errors are OpenAI's, as on the admin routes
)


def register_blueprints(app):
    """Register every endpoint's blueprint on app, and note the family of each."""
    families = app.extensions["families"] = {}
    for blueprint, family in BLUEPRINTS:
        app.register_blueprint(blueprint)
        families[blueprint.name] = family
    # By path too, for a request that matched no rule of its path (a wrong method): its family is still known.
    app.extensions["families_by_path"] = {
        rule.rule: families[rule.endpoint.partition(".")[0]] for rule in app.url_map.iter_rules()
        if families.get(rule.endpoint.partition(".")[0]) is not None}
