"""`reflow serve` on the tiny pipeline: samples for a request, the teacher beside them, errors as answers."""

import base64
import io

import pytest
from PIL import Image


@pytest.fixture(scope="module")
def client(reproduced_pipeline):
    from fastapi.testclient import TestClient

    from flows.serve import make_app

    return TestClient(make_app(reproduced_pipeline[0]))


def image_of(answer: dict) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert answer["image"].startswith(prefix)
    return Image.open(io.BytesIO(base64.b64decode(answer["image"][len(prefix):])))


def test_the_page_lists_the_trained_models_and_their_teacher(client):
    assert "reflow: sample a trained model" in client.get("/").text
    found = client.get("/api/models").json()
    assert {"dit", "rf1", "rf@2", "distill", "meanflow", "shortcut"} <= set(found["models"])
    assert found["teachers"] == {"class": "dit"}


def test_one_step_samples_of_the_student_and_the_teacher_at_its_steps(client):
    one = client.get("/api/sample", params={"model": "distill", "steps": 1, "n": 4, "label": 3}).json()
    assert one["nfe"] == 1 and one["samples"] == 4
    assert image_of(one).size[0] > 32  # a 2 x 2 grid of 32 px images
    assert one["fid"] and all(p["ci"][0] <= p["fid"] <= p["ci"][1] for p in one["fid"])
    assert one["lineage"]["path"].endswith("distill/transformer")
    teacher = client.get("/api/sample", params={"model": "dit", "steps": 10, "n": 4, "label": 3}).json()
    assert teacher["steps"] == 10 and teacher["nfe"] >= 10  # the flow-matching teacher at its own steps
    again = client.get("/api/sample", params={"model": "distill", "steps": 1, "n": 4, "label": 3}).json()
    assert again["image"] == one["image"]  # same seed, same samples
    other = client.get("/api/sample", params={"model": "distill", "steps": 1, "n": 4, "label": 3, "seed": 1}).json()
    assert other["image"] != one["image"]


@pytest.mark.parametrize(("params", "says"), [
    ({"model": "nope"}, "unknown model 'nope'"),
    ({"model": "distill", "steps": 0}, "steps (NFE) must be 1..1000, not 0"),
    ({"model": "distill", "label": 99}, "--class 99 is out of range"),
    ({"model": "distill", "n": 100000}, "n must be 1..64 samples, not 100000"),
    ({"model": "shortcut", "steps": 3}, "step counts it was trained for"),
    ({"model": "distill", "steps": "many"}, "steps"),
])
def test_a_bad_request_is_an_error_in_the_answer_and_the_server_keeps_serving(client, params, says):
    bad = client.get("/api/sample", params=params)
    assert bad.status_code == 400
    assert says in bad.json()["error"]
    good = client.get("/api/sample", params={"model": "rf1", "steps": 1, "n": 1})
    assert good.status_code == 200 and good.json()["nfe"] == 1
