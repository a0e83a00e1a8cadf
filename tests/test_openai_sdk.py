"""End to end with the official openai package as the client, through waitress, against the real llama.cpp."""
import openai
import pytest

pytestmark = pytest.mark.llama

USER = [{"role": "user", "content": "Say hello"}]
EXACT = {"ignore_eos": True}  # the random demo model may stop early otherwise


@pytest.fixture
def sdk(llama_app, live_gateway):
    """An OpenAI client pointed at the gateway's /v1, as a user would configure it."""
    client = openai.OpenAI(base_url=live_gateway(llama_app) + "/v1", api_key="local", max_retries=0, timeout=30)
    yield client
    client.close()


def test_chat(sdk):
    completion = sdk.chat.completions.create(model="llama", messages=USER, max_tokens=5, extra_body=EXACT)
    assert completion.choices[0].message.role == "assistant"
    assert completion.usage.completion_tokens == 5


def test_chat_stream_with_usage(sdk):
    stream = sdk.chat.completions.create(model="llama", messages=USER, max_tokens=4, stream=True,
                                         stream_options={"include_usage": True}, extra_body=EXACT)
    chunks = list(stream)
    # (llama.cpp leaves out the opening role-only delta now and then, so the role is not asserted.)
    assert all(isinstance(chunk.choices[0].delta.content or "", str) for chunk in chunks[:-1])
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 4
    assert chunks[-1].choices == []


def test_completions(sdk):
    completion = sdk.completions.create(model="llama", prompt="Once", max_tokens=3, extra_body=EXACT)
    assert completion.usage.completion_tokens == 3
    assert isinstance(completion.choices[0].text, str)


def test_embeddings_with_the_sdk_default_base64(sdk):
    # Without encoding_format the SDK asks for base64 and decodes the float32 bytes itself.
    result = sdk.embeddings.create(model="llama", input=["hello", "world"])
    assert len(result.data) == 2
    assert all(len(item.embedding) == 64 for item in result.data)
    assert abs(sum(x * x for x in result.data[0].embedding) - 1.0) < 1e-3


def test_embeddings_as_float(sdk):
    result = sdk.embeddings.create(model="llama", input="hello", encoding_format="float")
    assert len(result.data[0].embedding) == 64


def test_models(sdk):
    models = sdk.models.list()
    assert [model.id for model in models.data] == ["demo"]
    assert models.data[0].owned_by == "llamacpp"


@pytest.mark.parametrize("call, error_class, status", [
    (lambda sdk: sdk.chat.completions.create(model="llama", messages=[{"content": "no role"}]),
     openai.BadRequestError, 400),
    (lambda sdk: sdk.chat.completions.create(model="llama", messages=USER, temperature="hot"),
     openai.BadRequestError, 400),
    (lambda sdk: sdk.completions.create(model="llama", prompt="a " * 5000, max_tokens=1),
     openai.BadRequestError, 400),
    (lambda sdk: sdk.files.list(), openai.NotFoundError, 404),
])
def test_gateway_errors_raise_the_matching_sdk_exception(sdk, call, error_class, status):
    with pytest.raises(error_class) as caught:
        call(sdk)
    assert caught.value.status_code == status
    assert caught.value.body["message"]  # the SDK found our envelope's error object
