"""Model input text for the three memory modes and for chat messages (the templates docs/serving.md documents);
the server and `memory3 eval` both use them, so the RAG baseline the report measures is the RAG mode served.

Chat template (plain text, one line per message, the model continues after the final "Assistant:"):

    System: <content>
    User: <content>
    Assistant: <content>
    User: <content>
    Assistant:

RAG template (memory_mode "rag"): each retrieved reference as a "Reference: <text>" line before the prompt, the
same plain-text baseline as the paper's RAG comparison (§7.4, references retrieved once per question).
"""
from __future__ import annotations

ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}
CHAT_STOP = ["\nUser:", "\nSystem:"]
"""Chat stops before the model starts writing the next turn."""


def render_chat(messages: list[dict]) -> str:
    lines = [f"{ROLE_NAMES[m['role']]}: {m['content']}" for m in messages]
    return "\n".join(lines + ["Assistant:"])


def chat_query(messages: list[dict]) -> str:
    """What a chat retrieves with in RAG mode: the last user message (else the whole rendered chat)."""
    for m in reversed(messages):
        if m["role"] == "user" and m["content"].strip():
            return m["content"]
    return render_chat(messages)


def rag_prompt(references: list[str], prompt: str) -> str:
    return "".join(f"Reference: {text.strip()}\n" for text in references) + prompt
