"""The OpenAPI document says what the server does: schemathesis generates requests from it (valid
and invalid, a bounded number) against a real server and checks every answer's status code,
content type, headers and body against the document."""
import pytest

import engine
from engine.serving.http import create_app
from servers import Server

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def server():
    model = engine.load("digits", num_sampling_steps="10")
    srv = Server(create_app(model=model, model_name="digits", max_images_per_request=2, warmup=False,
                            api_keys=["key"], timeout=30)).wait_healthy()
    yield srv
    srv.stop()


def test_every_answer_matches_the_document(server):
    from hypothesis import given
    from schemathesis.specs.openapi.checks import ignored_auth

    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 5
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)
        def check(case):
            # ignored_auth re-sends without credentials, but an explicit header stays: the
            # keys are checked in test_operations.py instead.
            case.call_and_validate(headers={"authorization": "Bearer key"}, excluded_checks=[ignored_auth])
        check()


def test_the_document_states_bounds_errors_and_metrics(server):
    """Was: nothing required, no error responses, no bounds, /metrics documented as JSON."""
    doc = server.client.get("/openapi.json").json()
    body = doc["components"]["schemas"]["ImageGenerationRequest"]
    assert body["properties"]["n"]["maximum"] == 2 and body["properties"]["n"]["minimum"] == 1
    assert body["properties"]["class_label"]["anyOf"][0]["maximum"] == 9
    assert {"required": ["class_label"]} .items() <= body["anyOf"][0].items()
    post = doc["paths"]["/v1/images/generations"]["post"]
    assert post["requestBody"]["required"] is True
    assert {"400", "401", "413", "429", "500", "503", "504"} <= set(post["responses"])
    assert list(doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    assert "404" in doc["paths"]["/v1/models/{model_id}"]["get"]["responses"]
