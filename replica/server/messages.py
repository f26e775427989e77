"""API chat messages (OpenAI's, Ollama's) → the message dicts a chat template reads.

The one place that maps roles: "developer" is OpenAI's newer name for "system", which is the
only name chat templates know.
"""


def template_role(role: str) -> str:
    return "system" if role == "developer" else role


def openai_messages(messages) -> list[dict]:
    """OpenAI `ChatMessage` bodies → template messages."""
    return [{"role": template_role(m.role), "content": m.text()} for m in messages]


def ollama_messages(messages) -> list[dict]:
    """Ollama `OllamaMessage` bodies → template messages."""
    return [{"role": template_role(m.role), "content": m.content} for m in messages]
