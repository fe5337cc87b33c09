"""vlchat.serve.serving in-process: a text-only model refuses an image part in one line (400, the part
named) instead of dropping it unseen (a text-only model has no image slots, so the image was ignored)."""

from __future__ import annotations

import time

import pytest

from vlchat.serve import protocol as p
from vlchat.serve.serving import ApiError, ChatService, ServeConfig

RED_PIXEL = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"
)


@pytest.fixture(scope="module")
def text_only_service(tiny_lm_dir):
    from vlchat.chat.engine import Chat
    from vlchat.model.loaders import model_config
    from vlchat.model.vlm import load_model

    config = model_config(str(tiny_lm_dir))
    service = ChatService(ServeConfig(), lambda: Chat(load_model(config)), "tiny-text", config.template)
    deadline = time.monotonic() + 120
    while not service.ready:
        assert service.load_error is None and time.monotonic() < deadline, service.load_error
        time.sleep(0.05)
    return service


def request(content) -> p.ChatCompletionRequest:
    return p.ChatCompletionRequest(model="vlchat-tiny-text", messages=[{"role": "user", "content": content}])


def test_a_text_only_model_refuses_an_image_part(text_only_service):
    content = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": RED_PIXEL}}]
    with pytest.raises(ApiError) as error:
        text_only_service.completion_job(request(content), lambda event: None)
    assert error.value.status == 400 and error.value.param == "messages[0].content[1]"
    assert error.value.message == "vlchat-tiny-text is text-only: it cannot take images"


def test_a_text_only_model_takes_text_parts(text_only_service):
    job = text_only_service.completion_job(request([{"type": "text", "text": "Hello"}]), lambda event: None)
    assert job.images == {} and job.keys
