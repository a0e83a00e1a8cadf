"""Warm conversations through the gateway, as the tests drive them: a gateway (create_app over a real Fleet of
demo-model copies, MODELS_MAX_LOADED=1, so that a request to one model unloads the other) keeping slot states in
a folder of the test's, a long conversation, and what the gateway tells of it (usage, log line, metrics)."""
import contextlib
import os
import shutil
import threading

from prometheus_client.parser import text_string_to_metric_families

from service import create_app
from service.config import load_settings
from service.llama.fleet import Fleet
from service.models.spec import ModelSet, ModelSpec
from service.warm.prefix import prefix_keys
from tests.apps import FAST_SETTINGS

# The demo tokenizer makes about a token of each character: a conversation of ~1,200 tokens.
PROMPT_WORDS = 160
# A "hi" to swap models holds ~60 tokens, a conversation ~1,200: only conversations are saved.
MIN_TOKENS = 200
# One model loaded at a time, 2 slots of 2,048 tokens (a conversation of ~1,000 tokens fits one), one thread, and
# no host-memory prompt cache in llama.cpp: a prompt found computed came from a live slot or a restore. Saves
# when a slot is idle (a second) or before an unload; the periodic one is far off unless a test says otherwise.
WARM_SETTINGS = {"MODELS_MAX_LOADED": "1", "LLAMA_CTX": "4096", "LLAMA_PARALLEL": "2", "LLAMA_THREADS": "1",
                 "LLAMA_CACHE_RAM_MIB": "0", "LLAMA_EMBEDDINGS": "false", "LLAMA_STARTUP_TIMEOUT_S": "30",
                 "KV_CACHE_DISK_MIB": "64", "KV_SAVE_MIN_TOKENS": str(MIN_TOKENS), "KV_SAVE_INTERVAL_S": "600",
                 "MODEL_IDLE_TTL_S": "0"}


def model_copies(source, folder, names=("a", "b")) -> dict:
    """{name: path} of a copy of the demo GGUF per name in folder (each its own file, so its own identity)."""
    os.makedirs(folder, exist_ok=True)
    paths = {}
    for name in names:
        paths[name] = os.path.join(folder, f"{name}.gguf")
        shutil.copyfile(source, paths[name])
    return paths


def conversation(topic, words=PROMPT_WORDS) -> list:
    """A conversation's messages: a long system prompt of its own (topic) and a question."""
    system = " ".join(f"{topic}{number % 97}" for number in range(words))
    return [{"role": "system", "content": system}, {"role": "user", "content": f"Say something about {topic}."}]


def next_turn(messages, answer) -> list:
    """The conversation with the model's answer and the next question."""
    return [*messages, {"role": "assistant", "content": answer}, {"role": "user", "content": "And then?"}]


class Gateway:
    """The gateway app over a started Fleet of models ({name: GGUF path}), keeping slot states under kv_dir."""

    def __init__(self, models: dict, kv_dir, upstreams=None, spec_fields=None, **settings):
        """models: {name: GGUF path} run here; upstreams: {name: URL} of models run elsewhere; spec_fields:
        {name: {ModelSpec field: value}} for models run here (as a models file would say)."""
        config = {**FAST_SETTINGS, **WARM_SETTINGS, "KV_CACHE_DIR": str(kv_dir), **settings}
        specs = [ModelSpec(name, source=path, **(spec_fields or {}).get(name, {})) for name, path in models.items()]
        specs += [ModelSpec(name, upstreams=(url,)) for name, url in (upstreams or {}).items()]
        model_set = ModelSet(tuple(specs), file="models.toml")
        self.fleet = Fleet(model_set, load_settings(config))
        self.app = create_app({**config, "TESTING": True}, pool=self.fleet.pool, models=model_set,
                              local_urls=self.fleet.local_urls)
        self.warm = self.app.extensions["warm"]
        self.client = self.app.test_client()
        self.fleet.start()

    def chat(self, model, messages, **fields):
        """POST /v1/chat/completions; the response (asserted 200)."""
        body = {"model": model, "messages": messages, "max_tokens": 4, "temperature": 0, **fields}
        return self.post("/v1/chat/completions", body)

    def post(self, path, body, status=200):
        """POST body to path; the response, read and closed (its close ends the request: the slot and the model
        are given back, the log line written), its status asserted."""
        response = self.client.post(path, json=body)
        response.get_data()
        response.close()
        assert response.status_code == status, response.get_data(as_text=True)
        return response

    def swap_to(self, model):
        """A short request to model: with one model loaded at a time, the other one is unloaded first."""
        self.chat(model, [{"role": "user", "content": "hi"}])

    def metric(self, name, **labels) -> float:
        """The value of one sample of /metrics (0 when absent)."""
        text = self.client.get("/metrics").get_data(as_text=True)
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return sample.value
        return 0.0

    def supervisor(self, model):
        """The supervisor of model's llama.cpp."""
        return self.fleet.pool.model_named(model).supervisor

    def state_path(self, model, messages) -> str:
        """Where model's state of a chat of these messages is saved (named by the chat's longest prefix key)."""
        name = prefix_keys({"messages": messages})[-1].hex() + ".state"
        return os.path.join(self.app.config["KV_CACHE_DIR"], self.supervisor(model).kv_identity, name)

    def stop(self):
        """Stop the models (warm conversations save their slots first), the saver and the upstream's sessions."""
        try:
            self.fleet.stop()
        finally:
            if self.warm is not None:
                self.warm.stop()
            self.app.extensions["upstream"].close()


@contextlib.contextmanager
def late_load_listeners(pool):
    """Within: the pool's listeners hear of each load only on leaving (a metrics exporter slower than the requests
    the load lets in). What a request needs of its model's fresh llama.cpp must not wait for them."""
    done = threading.Event()

    def late(event):
        if event.kind == "load":
            done.wait(30)
    pool.listeners.insert(0, late)
    try:
        yield
    finally:
        done.set()
        pool.listeners.remove(late)


def cached_tokens(response) -> int:
    """prompt_tokens_details.cached_tokens of a chat answer (0 when absent)."""
    usage = response.get_json()["usage"]
    return (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0


def answer_of(response) -> str:
    """The text a chat answer gave."""
    return response.get_json()["choices"][0]["message"]["content"] or ""
