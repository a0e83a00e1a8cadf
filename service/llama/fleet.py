"""The local models of a ModelSet (those with a source), one supervised llama.cpp each, in a pool that loads them
on demand; and the change to another ModelSet while the gateway runs (a reload of the models file).

What one spec becomes (its files, its command line, its pool settings) is launch.py's.
"""
from dataclasses import replace

from ..models.errors import LlamaStartError
from ..models.names import model_name
from ..models.spec import diff
from ..paths import MODELS_DIR
from . import supervisor as supervisors
from .launch import check_loadable, lifecycle, pooled_model, resolve_files, supervisor_for
from .pool import ModelPool

# How many ports the OS may offer before the fleet gives up finding one no model of its own has.
PORT_TRIES = 20


class Fleet:
    """The supervised llama.cpp servers of a ModelSet's local models, in a pool that loads them on demand."""

    def __init__(self, model_set, settings, models_dir: str = None, *, launch=None):
        """Prepare (not start) a llama.cpp per spec with a source, each hf: file fetched first (raises
        LlamaStartError if one cannot be had). launch(spec, port, loadable=False) -> PooledModel replaces the real
        making of one (tests); loadable: refuse (ModelsFileError) a file llama.cpp could not load."""
        self.settings = settings
        self.models_dir = models_dir or settings["MODELS_DIR"] or MODELS_DIR
        self.launch = launch or self._launch
        self.model_set = model_set
        local = [spec for spec in model_set.specs if spec.source]
        # LLAMA_PORT holds for one model; several get free ports, each its own.
        if len(local) == 1:
            pooled = [self.launch(local[0], settings["LLAMA_PORT"])]
        else:
            taken = set()
            pooled = [self._launch_on(spec, None, taken) for spec in local]
        self.supervisors = {spec.id: model.supervisor for spec, model in zip(local, pooled)}  # by spec id
        self.pool = ModelPool(pooled, max_loaded=settings["MODELS_MAX_LOADED"],
                              memory_mib=settings["MODELS_MEMORY_MIB"], load_timeout_s=settings["LLAMA_STARTUP_TIMEOUT_S"])

    def _launch(self, spec, port=None, *, loadable=False):
        files = resolve_files(spec, self.models_dir)
        if loadable:
            # A reload checks what a start leaves to llama.cpp (a model that cannot load fails alone, at its load,
            # and the others serve): a running model must not be stopped for a file that cannot replace it.
            check_loadable(spec, files)
        if self.model_set.any_name:
            # A model that takes any name is named after its file (by llama.cpp and the pool), as one llama-server
            # names its model: an hf: name's file is known only now.
            spec = replace(spec, id=model_name(files.model))
        supervisor = supervisor_for(spec, self.settings, files, port=port, alias=spec.id)
        return pooled_model(spec, supervisor, self.settings, files)

    @property
    def local_urls(self) -> dict:
        """Each local model's id -> the URL of its llama.cpp (for the routes)."""
        return {name: supervisor.url for name, supervisor in self.supervisors.items()}

    def start(self):
        """Start the llama.cpp servers that load at start (every one, unless MODELS_MAX_LOADED is set) side by
        side and wait until all serve; raise LlamaStartError if one does not."""
        self.pool.start()
        return self

    def stop(self):
        """Stop every llama.cpp."""
        self.pool.stop()

    def apply(self, model_set, router) -> dict:
        """Serve model_set from now on, through the pool's lifecycle and router's routes: an added model joins the
        pool, then gets its route; a removed one loses its route, then drains and stops; a changed one restarts
        with its new command line once idle, on the same URL; an updated one changes in place. No request is
        routed to a model the pool does not know. Returns the ids of each kind; raises (changing nothing) when a
        new model's files cannot be had (LlamaStartError) or are not GGUF (ModelsFileError), or the routes refuse
        the set."""
        changes = diff(self.model_set.specs, model_set.specs)
        # All that can fail before anything changes: the fetches of new files (each one GGUF), the free ports.
        taken = {supervisor.port for supervisor in self.supervisors.values()}
        taken.update(model.supervisor.port for model in list(self.pool.by_url.values()))  # retiring ones too
        launched = {spec.id: self._launch_on(spec, self.supervisors.get(spec.id), taken, loadable=True)
                    for spec in changes.added + changes.changed if spec.source}
        joining = [model for name, model in launched.items() if name not in self.supervisors]  # a file's: by id
        # Removed, or run elsewhere from now on (upstreams only): its llama.cpp here stops.
        leaving = [spec.id for spec in changes.removed + changes.changed
                   if spec.id in self.supervisors and spec.id not in launched]
        supervisors = {name: supervisor for name, supervisor in self.supervisors.items() if name not in leaving}
        supervisors.update((name, model.supervisor) for name, model in launched.items())
        joined = []
        try:
            for model in joining:
                self.pool.add(model)  # before its route: a request routed there finds it
                joined.append(model)
            router.apply(model_set, {name: supervisor.url for name, supervisor in supervisors.items()})
        except BaseException:
            for model in joined:
                self.pool.retire(model.name)  # never routed: forgotten (and stopped, if it loaded meanwhile)
            raise
        for name in leaving:
            self.pool.retire(name)  # after its route is gone: requests in flight finish, new ones get 404
        for spec in changes.changed + changes.live:
            if spec.id in launched and spec.id in self.supervisors:
                model = launched[spec.id]
                self.pool.replace(spec.id, model.supervisor, **lifecycle(spec, self.settings), need_mib=model.need_mib)
            elif spec in changes.live and spec.id in supervisors:
                self.pool.update(spec.id, **lifecycle(spec, self.settings))
        self.model_set, self.supervisors = model_set, supervisors
        return {"added": [spec.id for spec in changes.added], "removed": [spec.id for spec in changes.removed],
                "changed": [spec.id for spec in changes.changed], "updated": [spec.id for spec in changes.live]}

    def _launch_on(self, spec, previous, taken, **options):
        """launch() spec on previous's port (a changed model keeps its URL: the routes and the pool know it by it),
        else on a free port none of taken is; the port is then taken. An unloaded model holds no socket, so the OS
        may offer its port as free."""
        port = previous.port if previous is not None else self._free_port(taken)
        model = self.launch(spec, port, **options)
        # Picked the same way as before; a new one's picked free here, not set by LLAMA_PORT.
        model.supervisor.port_chosen = previous.port_chosen if previous is not None else True
        taken.add(port)
        return model

    @staticmethod
    def _free_port(taken) -> int:
        for _ in range(PORT_TRIES):
            port = supervisors.free_port()
            if port not in taken:
                return port
        raise LlamaStartError(f"no free port for a new llama.cpp in {PORT_TRIES} tries: each one offered was a "
                              "model's own")
