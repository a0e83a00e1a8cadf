"""The admin routes' guard: wrong admin keys slow a guesser down (per address, growing lockouts, counted in
/metrics), a client's attempt names its client, /admin/... is admin and without CORS, and the page's unknown
paths and wrong methods answer 404/405 with the page's security headers."""
import pytest

from service.policy.admin_guard import AdminGuard, AdminLockedOut
from service.ui.views import SECURITY_HEADERS
from tests.clients import assert_openai_envelope
from tests.fakes import Clock

ADMIN_KEY = "sk-admin-guard-test-1234"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
WRONG = {"Authorization": "Bearer sk-admin-guard-test-0000"}
SETTINGS = {"ADMIN_API_KEY": ADMIN_KEY, "OPENAI_API_KEYS": "key-a:team_a"}
STATE = "/ui/api/state"


def locked(guard, address="10.0.0.1") -> AdminLockedOut:
    with pytest.raises(AdminLockedOut) as caught:
        guard.check(address)
    return caught.value


def test_five_wrong_keys_lock_an_address_out_and_each_next_one_doubles_it():
    clock = Clock()
    guard = AdminGuard(clock=clock)
    for _ in range(4):
        guard.failed("10.0.0.1")
        guard.check("10.0.0.1")
    guard.failed("10.0.0.1")
    error = locked(guard)
    assert error.status == 429 and error.code == "admin_auth_locked" and error.headers["Retry-After"] == "10"
    guard.check("10.0.0.2")  # another address is not concerned
    clock.now += 10
    guard.check("10.0.0.1")  # the lockout is over
    guard.failed("10.0.0.1")  # one wrong key is enough now
    assert locked(guard).headers["Retry-After"] == "20"
    clock.now += 20 + 900  # quiet long enough: a fresh start
    for _ in range(4):
        guard.failed("10.0.0.1")
    guard.check("10.0.0.1")


def test_wrong_keys_outside_the_window_do_not_add_up():
    clock = Clock()
    guard = AdminGuard(clock=clock)
    for _ in range(10):
        guard.failed("a")
        clock.now += 15  # 4 within any minute
    guard.check("a")


def test_the_right_key_forgets_the_mistakes_and_memory_is_bounded():
    guard = AdminGuard(clock=Clock(), max_addresses=3)
    for _ in range(4):
        guard.failed("a")
    guard.succeeded("a")
    for _ in range(4):
        guard.failed("a")
    guard.check("a")
    for address in ("b", "c", "d", "e"):
        guard.failed(address)
    assert guard.tracked_addresses() == 3


@pytest.fixture
def gateway(make_app, httpserver):
    return lambda **settings: make_app(httpserver.url_for("").rstrip("/"), **SETTINGS, **settings).test_client()


def test_a_guesser_is_refused_even_the_right_key_and_counted(gateway):
    client = gateway()
    guesser = {"REMOTE_ADDR": "192.0.2.7"}
    for _ in range(5):
        assert_openai_envelope(client.get(STATE, headers=WRONG, environ_base=guesser), 401)
    refused = client.get(STATE, headers=ADMIN, environ_base=guesser)
    assert assert_openai_envelope(refused, 429)["code"] == "admin_auth_locked"
    assert refused.headers["Retry-After"] == "10"
    assert client.post("/models/load", json={"model": "x"}, headers=ADMIN, environ_base=guesser).status_code == 429
    assert client.get(STATE, headers=ADMIN, environ_base={"REMOTE_ADDR": "192.0.2.8"}).status_code == 200
    assert client.get("/v1/models", headers={"Authorization": "Bearer key-a"},
                      environ_base=guesser).status_code != 429  # the API itself is not the admin's
    metrics = client.get("/metrics").get_data(as_text=True)
    assert "gateway_admin_auth_failures_total 5.0" in metrics
    assert ADMIN_KEY not in metrics and "guard-test" not in metrics


def test_a_missing_key_or_a_client_s_key_is_no_guess(gateway):
    client = gateway()
    for _ in range(6):
        assert_openai_envelope(client.get(STATE), 401)
        assert_openai_envelope(client.get(STATE, headers={"Authorization": "Bearer key-a"}), 403)
    assert client.get(STATE, headers=ADMIN).status_code == 200


def test_a_client_s_attempt_on_an_admin_route_names_its_client(gateway):
    client = gateway()
    seen = []
    client.application.extensions["request_sinks"].append(lambda entry, record: seen.append(entry))
    response = client.post("/models/load", json={"model": "x"}, headers={"Authorization": "Bearer key-a"})
    response.close()
    assert response.status_code == 403
    assert seen[-1]["client_id"] == "team_a" and seen[-1]["status"] == 403


def test_admin_rules_are_every_admin_path_and_have_no_cors(gateway):
    from service.policy.hooks import is_admin_rule

    assert is_admin_rule("/admin/keys/<key_id>") and is_admin_rule("/models/load")
    assert not is_admin_rule("/v1/models") and not is_admin_rule("/administer")
    client = gateway(CORS_ORIGINS="https://app.example")
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization"}
    for path in ("/admin/keys", "/admin/keys/key_0123456789ab", "/admin/usage"):
        assert "Access-Control-Allow-Origin" not in client.options(path, headers=preflight).headers, path
        answer = client.get(path, headers={"Origin": "https://app.example", **ADMIN})
        assert "Access-Control-Allow-Origin" not in answer.headers, path
    allowed = client.options("/v1/chat/completions", headers=preflight)
    assert allowed.headers["Access-Control-Allow-Origin"] == "https://app.example"


@pytest.mark.parametrize("method, path, status", [
    ("GET", "/ui/api/chat", 405), ("PUT", STATE, 405), ("GET", "/ui/api/nope", 404), ("POST", "/ui/api/x/y", 404),
    ("GET", "/ui/nothing", 404),
])
@pytest.mark.parametrize("headers", [ADMIN, {}])
def test_the_page_s_unknown_paths_and_wrong_methods(gateway, method, path, status, headers):
    response = gateway().open(path, method=method, headers=headers)
    error = assert_openai_envelope(response, status)
    assert ("Unknown route" if status == 404 else "is not allowed") in error["message"]
    for name, value in SECURITY_HEADERS.items():
        assert response.headers[name] == value, name
    assert response.headers["Cache-Control"] == "no-store"


def test_the_right_key_wipes_an_address_s_slate(gateway):
    client = gateway()
    for _ in range(2):
        for _ in range(4):
            assert_openai_envelope(client.get(STATE, headers=WRONG), 401)
        assert client.get(STATE, headers=ADMIN).status_code == 200  # 8 wrong keys in a minute, never 5 in a row
