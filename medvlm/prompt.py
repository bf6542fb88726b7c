"""Chat prompts with the scan in them: one placeholder for training and inference alike."""

from __future__ import annotations

import copy

from .errors import UserInputError


def with_scan(messages: list[dict], image_token: str) -> list[dict]:
    """A copy of `messages` whose first user turn starts with the scan placeholder and a newline."""
    messages = copy.deepcopy(messages)
    for message in messages:
        if message["role"] == "user":
            message["content"] = f"{image_token}\n{message['content']}"
            return messages
    raise ValueError("a conversation about a scan needs at least one user message")


def expand_scan(text: str, image_token: str, num_visual_tokens: int) -> str:
    """Expand the single scan placeholder in a templated prompt to one copy per visual token."""
    if text.count(image_token) != 1:
        raise ValueError(f"expected one {image_token!r} placeholder in the prompt, found {text.count(image_token)}")
    return text.replace(image_token, image_token * num_visual_tokens)


def check_plain_text(tokenizer, messages: list[dict], image_token: str) -> None:
    """Refuse message text that holds the model's control tokens (the scan placeholder, the chat format's turn
    markers): tokenised as such, a question could end its own turn or claim a second scan."""
    control = {image_token, *tokenizer.all_special_tokens}
    for message in messages:
        found = sorted(token for token in control if token and token in message["content"])
        if found:
            raise UserInputError(f"the {message['role']}'s text holds {found[0]!r}, one of the model's control "
                                 "tokens; remove it and try again")


def prompt_text(tokenizer, messages: list[dict], image_token: str, num_visual_tokens: int,
                add_generation_prompt: bool) -> str:
    """The chat-templated prompt for a conversation about one scan, placeholders expanded; message text that
    holds a control token raises UserInputError (`check_plain_text`)."""
    check_plain_text(tokenizer, messages, image_token)
    text = tokenizer.apply_chat_template(with_scan(messages, image_token), tokenize=False,
                                         add_generation_prompt=add_generation_prompt)
    return expand_scan(text, image_token, num_visual_tokens)
