"""POST /models/reload: read the models file again and apply the difference (service/models/reload.py).

Only ADMIN_API_KEY reaches this view (policy/hooks.py). The answer lists what was done by model id:
{"added": [...], "removed": [...], "changed": [...], "updated": [...]}. A file with any problem changes nothing
and gets a 400 whose message lists them, one line each (FILE:LINE: models.NAME.KEY: what); a POST while another
reload is under way gets a 409 reload_in_progress at once.
"""
from flask import Blueprint, current_app, jsonify

from ..errors import ApiError
from ..models.reload import ReloadBusy, ReloadError

bp = Blueprint("reload", __name__)


class NoModelsFile(ApiError):
    """The models come from the environment, which cannot change under a running gateway."""

    status = 409
    code = "no_models_file"

    def __init__(self):
        super().__init__("No models file: the models come from the environment, which a running gateway cannot "
                         "re-read; describe them in models.toml (or the file MODELS_FILE names) to reload them",
                         type="invalid_request_error")


class ReloadRefused(ApiError):
    """A reload that changed nothing: the file has problems (400), or a model it names cannot be had now (503)."""

    def __init__(self, error: ReloadError):
        status, code = (503, "model_unavailable") if error.unavailable else (400, "models_file_invalid")
        super().__init__("\n".join(error.problems), status=status, code=code,
                         type="server_error" if error.unavailable else "invalid_request_error")


class ReloadInProgress(ApiError):
    """Another reload is under way (it may be fetching a model): this one is not queued behind it."""

    status = 409
    code = "reload_in_progress"

    def __init__(self, error: ReloadBusy):
        super().__init__("\n".join(error.problems), type="invalid_request_error")


@bp.post("/models/reload")
def reload_models():
    """Read the models file again and apply what changed; answer what was added, removed, changed, updated."""
    reloader = current_app.extensions.get("reloader")
    if reloader is None:
        raise NoModelsFile()
    try:
        return jsonify(reloader.reload("admin"))
    except ReloadBusy as error:
        raise ReloadInProgress(error) from None
    except ReloadError as error:
        raise ReloadRefused(error) from None
