"""The model pool as tests drive it: a pool of models on fake supervisors, stub routes, one request's whole life,
and a wait for a condition another thread brings about."""
import time

from service.llama.pool import ModelPool
from service.llama.pooled_model import PooledModel
from tests.fakes import FakeSupervisor


class Route:
    """What the pool reads of a routing.ModelRoute: its replicas' URLs."""

    def __init__(self, url):
        self.replicas = [type("Replica", (), {"url": url})()]
        self.removed = False


def make_pool(names=("a", "b", "c"), **options):
    """A pool of fake-supervised models, a Route to each by name, and the list its events are told to."""
    models = [PooledModel(name, FakeSupervisor(f"http://{name}"), **options.pop(f"{name}_options", {}))
              for name in names]
    events = []
    pool = ModelPool(models, load_timeout_s=options.pop("load_timeout_s", 5.0), **options)
    pool.listeners.append(events.append)
    return pool, {name: Route(f"http://{name}") for name in names}, events


def wait_until(predicate, timeout=5.0):
    """Wait for predicate to come true, failing the test if it does not within timeout seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition never came true"
        time.sleep(0.005)


def use(pool, route):
    """One request's whole life: claim, wait for the load, release."""
    hold = pool.claim(route)
    hold.wait()
    hold.release()
